"""The trainer end to end: real data path (demo data, tiny tokenizer), a Hugging Face --load, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_omni import save_hf_thinker

from omni_fast.config.mm_model import ModelSpec, load_model_json, model_json_from_spec, parse_model_json
from omni_fast.config.model_config import ThinkerConfig
from omni_fast.config.train_config import parse_args
from omni_fast.data import ensure_demo_data
from omni_fast.train import checkpoint as ckpt
from omni_fast.train.setup import build_trainer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="module")
def hf_dir(hf_tiny, tmp_path_factory):
    return save_hf_thinker(hf_tiny, tmp_path_factory.mktemp("hf") / "thinker", full=True)


def _torch_batch(batch: dict) -> dict:
    out = {}
    for key, value in batch.items():
        if key in ("sample_ids", "position_ids"):
            continue
        if isinstance(value, np.ndarray):
            t = torch.from_numpy(value)
            out[key] = t.float() if value.dtype.kind == "f" else t.long()
        else:
            out[key] = value
    if "feature_attention_mask" in out:
        out["feature_attention_mask"] = out["feature_attention_mask"].int()
    return out


@pytest.mark.parametrize("data_file", ["data_mllm.json", "data_video_audio.json"])
def test_first_step_loss_equals_transformers(hf_tiny, hf_dir, demo, data_file):
    parsed = parse_args(
        f"--load {hf_dir} --mm-data {demo / data_file} --micro-batch-size 1 --global-batch-size 1 "
        "--train-iters 1 --no-jit --seq-length 4096".split()
    )
    trainer = build_trainer(parsed)
    (index,) = trainer.sampler.rank_micro_batches(0, 1)
    batch = trainer.collate([trainer.dataset[int(i)] for i in index])
    with torch.no_grad():
        want = hf_tiny(**_torch_batch(batch)).loss.item()
    got = trainer.train_step().loss
    assert got == pytest.approx(want, rel=1e-5)


def test_structural_flag_disagreeing_with_the_model_is_ignored_with_a_warning(hf_dir, demo, caplog):
    parsed = parse_args(
        f"--load {hf_dir} --mm-data {demo / 'data_mllm.json'} --num-layers 28 --hidden-size 64 --train-iters 1".split()
    )
    with caplog.at_level("WARNING"):
        trainer = build_trainer(parsed)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "--num-layers 28 ignored: the model structure says 2" in messages
    assert "--hidden-size" not in messages  # agrees with the model
    assert len(trainer.model.model.layers) == 2


def test_tokenizer_and_model_token_ids_must_agree(demo, tmp_path):
    from omni_fast.train.setup import PRESETS

    spec = json.loads((PRESETS / "model_tiny.json").read_text())
    spec["image_token_id"] = 1013  # the tiny tokenizer's <|IMAGE|> is 1012
    (tmp_path / "model.json").write_text(json.dumps(spec))
    parsed = parse_args(f"--mm-model {tmp_path / 'model.json'} --mm-data {demo / 'data_mllm.json'}".split())
    with pytest.raises(ValueError, match="the tokenizer's image token id is 1012 but the model's is 1013"):
        build_trainer(parsed)


@pytest.mark.slow
def test_cli_default_run_trains_saves_and_resumes(tmp_path):
    """The README's main command, shortened: demo data, tiny model, loss falls, checkpoint written, resumable."""
    run = [sys.executable, "-m", "omni_fast.train"]
    common = [
        "--train-iters",
        "4",
        "--global-batch-size",
        "2",
        "--lr",
        "1e-3",
        "--save",
        str(tmp_path / "run"),
        "--save-interval",
        "2",
        "--no-jit",
    ]
    first = subprocess.run(run + common, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done: 4 iterations" in first.stdout
    assert ckpt.read_latest(tmp_path / "run") == "4"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert {"iteration", "loss", "lr", "grad_norm", "tokens_per_second"} <= records[0].keys()
    (tmp_path / "run" / ckpt.LATEST_FILE).write_text("2\n")  # the guide's way to pick the iteration to resume
    more = subprocess.run(
        run + ["--load", str(tmp_path / "run"), *common[:-3], "--train-iters", "5", "--no-jit"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from" in more.stderr and "at iteration 2" in more.stderr
    assert "done: 5 iterations" in more.stdout


def test_cli_rejects_contradicting_flags_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "omni_fast.train", "--calculate-per-sample-loss", "--calculate-per-token-loss"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--calculate-per-token-loss: cannot be combined with --calculate-per-sample-loss" in result.stderr
    assert not (tmp_path / "outputs").exists()  # stopped before generating demo data or anything else


def test_converted_release_loads_and_trainer_checkpoints_convert_back(hf_tiny, hf_dir, demo, tmp_path):
    """mm-convert hf_to_mm output is a valid --load; what the trainer saves, mm_to_hf turns back into HF weights."""
    from safetensors.numpy import load_file

    from omni_fast.convert import ParallelLayout, hf_to_mm, mm_to_hf

    layout = ParallelLayout((2,), (2,), (2,))
    hf_to_mm(hf_dir, tmp_path / "mm", layout)
    # a converted directory holds weights only: the structure comes from model.json, as in the reference
    spec = ModelSpec.from_thinker(ThinkerConfig.from_file(hf_dir / "config.json"))
    (tmp_path / "model.json").write_text(json.dumps(model_json_from_spec(spec)))
    flags = f"--mm-data {demo / 'data_mllm.json'} --micro-batch-size 1 --global-batch-size 1 --no-jit"
    from_hf = build_trainer(parse_args(f"--load {hf_dir} {flags} --train-iters 1".split()))
    with pytest.raises(ValueError, match="--mm-model is required"):
        build_trainer(parse_args(f"--load {tmp_path / 'mm'} {flags} --train-iters 1".split()))
    mm_flags = f"--load {tmp_path / 'mm'} --mm-model {tmp_path / 'model.json'} {flags} --train-iters 1"
    from_mm = build_trainer(parse_args(mm_flags.split()))
    assert from_mm.train_step().loss == from_hf.train_step().loss
    # lr 0: the saved weights are the loaded ones, so the round trip must give back the original tensors
    run = build_trainer(parse_args(f"--load {hf_dir} {flags} --train-iters 1 --lr 0 --save {tmp_path / 'run'}".split()))
    run.train()
    mm_to_hf(tmp_path / "run", hf_dir, tmp_path / "back")
    back = {}
    for file in sorted((tmp_path / "back").glob("*.safetensors")):
        back.update(load_file(str(file)))
    for name, value in hf_tiny.state_dict().items():
        np.testing.assert_array_equal(back[f"thinker.{name}"], value.numpy(), err_msg=name)


@pytest.mark.parametrize("name", ["model_7b.json", "model_tiny.json"])
def test_model_json_round_trips(name):
    from pathlib import Path

    spec = load_model_json(Path(__file__).parents[1] / "examples" / "qwen2.5omni" / name)
    again = parse_model_json(model_json_from_spec(spec))
    assert again.thinker == spec.thinker
    assert again.freeze == spec.freeze
    assert again.pipeline_num_layers == spec.pipeline_num_layers
    assert again.img_context_token_id == spec.img_context_token_id
