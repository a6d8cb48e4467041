"""Scale-out: pipeline layouts, stage ownership, the stage split of the forward, and msrun runs on 2 CPU workers.

The unit tests need no msrun. The ``slow`` tests launch ``msrun`` with 2 workers on 127.0.0.1 (about 15 s of start-up
per job here) and compare against the single-process trainer run in this process on the same data and flags:

* data parallel 2 with micro-batch 1 == one process with accumulation 2 (losses, weights), across a save/resume,
  and the resumed half run with ``--use-distributed-optimizer`` (its shards together == the unsharded state);
* pipeline 2 == pipeline 1 (losses), with the text starting on stage 0, and with a first stage holding only frozen
  encoders (``--enable-dummy-optimizer``); the pipeline checkpoint is read back with mm-convert's reader.

Every msrun job runs in its own process group, killed on timeout and after the job, so no worker outlives a test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from conftest import assert_rel_close
from demo_data import demo_root
from mindspore import ParameterTuple, Tensor, ops
from safetensors.numpy import load_file

from omni_fast.config.mm_model import load_model_json, parse_model_json
from omni_fast.config.train_config import TrainConfig, parse_args
from omni_fast.convert import read_mm_thinker
from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.parallel import validate
from omni_fast.parallel.layout import PipelineLayout, stage_parts, stage_trains, validate_pipeline_layout
from omni_fast.parallel.optimizer import assign_owners
from omni_fast.parallel.stage import PipelineStage
from omni_fast.parallel.training import OptimizerFiles
from omni_fast.train.setup import PRESETS, build_trainer
from omni_fast.train.trainer import apply_freeze

REPO = Path(__file__).resolve().parent.parent
MODEL_7B = REPO / "examples" / "qwen2.5omni" / "model_7b.json"
TINY = PRESETS / "model_tiny.json"


def spec_with(path: Path, vision, audio, text, **freeze):
    raw = json.loads(path.read_text())
    raw["image_encoder"]["vision_encoder"]["pipeline_num_layers"] = vision
    raw["audio_encoder"]["audio_encoder"]["pipeline_num_layers"] = audio
    raw["text_decoder"]["pipeline_num_layers"] = text
    for module, section in (("vision_encoder", raw["image_encoder"]["vision_encoder"]),
                            ("vision_projector", raw["image_encoder"]["vision_projector"]),
                            ("audio_encoder", raw["audio_encoder"]["audio_encoder"]),
                            ("text_decoder", raw["text_decoder"])):
        if module in freeze:
            section["freeze"] = freeze[module]
    return parse_model_json(raw)


# ---------------------------------------------------------------- layout validation (no msrun)


def test_guide_layout_is_accepted_and_places_front_and_back_ends():
    layout = validate_pipeline_layout(spec_with(MODEL_7B, [32, 0, 0, 0], [32, 0, 0, 0], [1, 10, 10, 7]), 4)
    assert layout.layer_range("text_decoder", 2) == range(11, 21)
    assert (layout.first_stage("text_decoder"), layout.last_stage("vision_encoder")) == (0, 0)
    stage0 = dict(stage_parts(layout, 0))
    assert {"model.embed_tokens.", "visual.patch_embed.", "visual.merger.", "audio_tower.conv1.",
            "audio_tower.proj.", "model.layers.0."} <= set(stage0)
    assert "lm_head." in dict(stage_parts(layout, 3)) and "model.norm." in dict(stage_parts(layout, 3))
    # MindSpeed-MM's nested (virtual-pipeline) form with a single chunk is the same layout.
    nested = spec_with(MODEL_7B, [[32, 0, 0, 0]], [[32, 0, 0, 0]], [[1, 10, 10, 7]])
    assert validate_pipeline_layout(nested, 4) == layout


@pytest.mark.parametrize(
    "vision, audio, text, size, message",
    [
        ([30, 2, 0, 0], [32, 0, 0, 0], [1, 10, 10, 7], 4,
         r"image_encoder.vision_encoder.pipeline_num_layers \[30, 2, 0, 0\] puts vision_encoder layers on stage 1, "
         r"after text_decoder.pipeline_num_layers \[1, 10, 10, 7\] starts the text layers on stage 0"),
        ([32, 0], [31, 1], [1, 27], 2, r"audio_encoder.audio_encoder.pipeline_num_layers \[31, 1\] puts "
         r"audio_encoder layers on stage 1, after text_decoder.pipeline_num_layers \[1, 27\] starts"),
        ([32, 0, 0], [32, 0, 0], [11, 17], 3, r"text_decoder.pipeline_num_layers \[11, 17\] has 2 entries, but "
         r"--pipeline-model-parallel-size is 3"),
        ([32, 0], [32, 0], [11, 16], 2, r"text_decoder.pipeline_num_layers \[11, 16\] sums to 27, but text_decoder "
         r"has 28 layers"),
        ([32, 0], [32, 0], [28, 0], 2, r"the last stage must hold text layers"),
        ([32, 0, 0], [32, 0, 0], [10, 0, 18], 3, r"stage 1 holds no layers"),
        ([32, -1], [32, 0], [11, 17], 2, r"image_encoder.vision_encoder.pipeline_num_layers must be a non-empty list"),
        ([[16, 0], [16, 0]], [32, 0], [11, 17], 2, r"2 virtual-pipeline chunks"),
    ],
)
def test_bad_layouts_are_rejected_naming_the_module_and_list(vision, audio, text, size, message):
    with pytest.raises(ValueError, match=message):
        validate_pipeline_layout(spec_with(MODEL_7B, vision, audio, text), size)


def test_lists_are_ignored_with_one_stage_and_required_with_two():
    # As in MindSpeed-MM: model_7b.json's two-stage lists do not stop a single-stage run.
    assert validate_pipeline_layout(load_model_json(MODEL_7B), 1) == PipelineLayout((32,), (32,), (28,))
    raw = json.loads(TINY.read_text())
    for section in (raw["image_encoder"]["vision_encoder"], raw["audio_encoder"]["audio_encoder"], raw["text_decoder"]):
        section.pop("pipeline_num_layers")
    spec = parse_model_json(raw)
    assert validate_pipeline_layout(spec, 1) == PipelineLayout((2,), (2,), (2,))
    with pytest.raises(ValueError, match=r"image_encoder.vision_encoder.pipeline_num_layers is missing: with "
                                         r"--pipeline-model-parallel-size 2 every module needs a list of 2"):
        validate_pipeline_layout(spec, 2)


def test_stage_count_must_divide_the_process_count(tmp_path):
    spec = spec_with(TINY, [2, 0], [2, 0], [1, 1])
    with pytest.raises(ValueError, match=r"--pipeline-model-parallel-size 2 does not divide the 3 process"):
        validate(TrainConfig(pipeline_model_parallel_size=2), spec, 3)
    (tmp_path / "model.json").write_text(json.dumps(spec.raw))
    argv = f"--mm-model {tmp_path / 'model.json'} --mm-data {demo_root() / 'data.json'}"
    argv += " --pipeline-model-parallel-size 2"
    with pytest.raises(ValueError, match=r"does not divide the 1 process\(es\) launched \(a plain python process"):
        build_trainer(parse_args(argv.split()))


def test_a_frozen_stage_needs_the_dummy_optimizer_flag():
    # The guide's example: a frozen ViT split [30, 2, 0, 0] and the text starting on stage 1 leave stage 0 frozen.
    spec = spec_with(MODEL_7B, [30, 2, 0, 0], [32, 0, 0, 0], [0, 11, 10, 7])
    with pytest.raises(ValueError, match=r"pipeline stage\(s\) \[0\] hold only frozen parameters .*add "
                                         r"--enable-dummy-optimizer"):
        validate(TrainConfig(pipeline_model_parallel_size=4), spec, 4)
    validate(TrainConfig(pipeline_model_parallel_size=4, enable_dummy_optimizer=True), spec, 4)
    # Stage 1 holds the last two (frozen) ViT layers and the projector, but also trainable text layers.
    layout = validate_pipeline_layout(spec, 4)
    assert [stage_trains(layout, spec.freeze, s) for s in range(4)] == [False, True, True, True]
    unfrozen = spec_with(MODEL_7B, [30, 2, 0, 0], [32, 0, 0, 0], [0, 11, 10, 7], vision_encoder=False)
    validate(TrainConfig(pipeline_model_parallel_size=4), unfrozen, 4)
    everything = spec_with(MODEL_7B, [32, 0], [32, 0], [11, 17], vision_encoder=True, vision_projector=True,
                           audio_encoder=True, text_decoder=True)
    with pytest.raises(ValueError, match="nothing to train"):
        validate(TrainConfig(pipeline_model_parallel_size=2, enable_dummy_optimizer=True), everything, 2)


@pytest.mark.parametrize(
    "layout",
    [PipelineLayout((2, 0), (2, 0), (1, 1)), PipelineLayout((1, 1, 0), (0, 2, 0), (0, 1, 1)),
     PipelineLayout((0, 2, 0), (1, 0, 1), (0, 0, 2))],
)
def test_stages_own_every_parameter_exactly_once_and_agree_with_freeze(layout):
    spec = load_model_json(TINY)
    model = Qwen2_5OmniThinker(spec.thinker)
    apply_freeze(model, {**spec.freeze, "vision_projector": False})
    owners: dict[str, int] = {}
    for s in range(layout.size):
        stage = PipelineStage(model, layout, s)
        for p in stage.parameters:
            assert p.name not in owners, f"{p.name} on stages {owners[p.name]} and {s}"
            owners[p.name] = s
        freeze = {**spec.freeze, "vision_projector": False}
        assert stage_trains(layout, freeze, s) == bool(stage.trainable_params())
    assert set(owners) == {name for name, _ in model.parameters_and_names()}


# ---------------------------------------------------------------- the stage split equals the whole forward


@pytest.fixture(scope="module")
def multimodal_batch():
    """One micro-batch holding an image sample and a video+audio sample of the demo data, planned by the model."""
    trainer = build_trainer(parse_args(f"--mm-data {demo_root() / 'data.json'} --no-jit --seq-length 4096".split()))
    picked: dict[str, int] = {}
    for i in range(len(trainer.dataset)):
        sample = trainer.collate([trainer.dataset[i]])
        if "pixel_values" in sample and "image" not in picked:
            picked["image"] = i
        if "pixel_values_videos" in sample and "input_features" in sample and "video" not in picked:
            picked["video"] = i
    assert set(picked) == {"image", "video"}, picked
    batch = trainer.collate([trainer.dataset[i] for i in picked.values()])
    model = trainer.model
    prepared = model.prepare_batch(**{k: v for k, v in batch.items() if k != "sample_ids"})
    assert prepared.image is not None and prepared.video is not None and prepared.audio is not None
    return model, prepared


@pytest.mark.parametrize(
    "layout",
    [
        PipelineLayout((2, 0), (2, 0), (1, 1)),  # the guide's shape: encoders and the first text layer on stage 0
        PipelineLayout((1, 1, 0), (0, 2, 0), (0, 1, 1)),  # vision split, audio on stage 1, text from stage 1
        PipelineLayout((1, 1, 0), (2, 0, 0), (0, 0, 2)),  # audio finished on stage 0 passes through stage 1
    ],
)
def test_chained_stages_equal_compute_in_loss_and_every_gradient(multimodal_batch, layout):
    model, prepared = multimodal_batch
    for p in model.get_parameters():
        p.requires_grad = p.name != "audio_tower.audio_bos_eos_token.weight"
    params = model.trainable_params()
    args = prepared.arguments()
    rng = np.random.default_rng(0)
    weights = Tensor((rng.random(prepared.labels[:, 1:].shape) * (prepared.labels[:, 1:] != -100)).astype(np.float32))

    def loss_fn(*a):
        return model.compute(*a)[1]

    want_loss, want_grads = ms.value_and_grad(loss_fn, None, params)(*args, weights)

    stages = [PipelineStage(model, layout, s) for s in range(layout.size)]
    inputs, carry = [], ()
    for stage in stages[:-1]:  # forward, stage by stage
        inputs.append(carry)
        carry = stage.function(args, weights)(*carry)
        assert len(carry) == len(stage.output_keys(args))
    last = stages[-1]
    got_loss, (sens, grads) = ms.value_and_grad(last.function(args, weights), tuple(range(len(carry))),
                                                last.trainable_params())(*carry)
    sens = (sens,) if isinstance(sens, Tensor) else sens  # a single grad position gives a lone tensor
    got = dict(zip((p.name for p in last.trainable_params()), grads))
    for stage, carry_in in zip(reversed(stages[:-1]), reversed(inputs)):  # backward, from the gradients received
        fn = stage.function(args, weights)
        if carry_in:
            sens, grads = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)(
                fn, ParameterTuple(stage.trainable_params()))(*carry_in, tuple(sens))
        else:
            grads = ops.GradOperation(get_by_list=True, sens_param=True)(
                fn, ParameterTuple(stage.trainable_params()))(tuple(sens))
        got.update(zip((p.name for p in stage.trainable_params()), grads))
    assert_rel_close(got_loss.asnumpy(), want_loss.asnumpy(), 1e-6, "loss")
    assert set(got) == {p.name for p in params}
    for p, want in zip(params, want_grads):
        assert_rel_close(got[p.name].asnumpy(), want.asnumpy(), 1e-5, p.name)


# ---------------------------------------------------------------- distributed optimizer pieces (no msrun)


def test_owners_balance_parameter_sizes_deterministically():
    sizes = [100, 1, 50, 50, 3, 98]
    owners = assign_owners(sizes, 2)
    assert owners == assign_owners(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert sorted(load) == [151, 151]
    assert assign_owners(sizes, 1) == [0] * len(sizes)


def test_optimizer_files_merge_shards_and_read_only_what_is_asked(tmp_path):
    from safetensors.numpy import save_file

    for rank, name, value in ((0, "exp_avg.a", np.ones(2, np.float32)), (1, "exp_avg.b", np.zeros(3, np.float32))):
        save_file({"step": np.array(3), name: value}, str(tmp_path / f"optimizer_dp_{rank:03d}.safetensors"))
    files = OptimizerFiles(tmp_path)
    assert set(files) == {"step", "exp_avg.a", "exp_avg.b"}
    assert files["exp_avg.b"].shape == (3,) and int(files["step"]) == 3
    with pytest.raises(Exception, match="--no-load-optim"):
        OptimizerFiles(tmp_path / "nowhere")


# ---------------------------------------------------------------- msrun, 2 CPU workers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def msrun(args: list[str], workdir: Path, timeout: float = 300) -> str:
    """Run ``python -m omni_fast.train ARGS`` under msrun with 2 workers; returns rank 0's log."""
    assert shutil.which("msrun"), "msrun (MindSpore's launcher) is not on PATH"
    log_dir = workdir / f"msrun_log_{len(list(workdir.glob('msrun_log_*')))}"
    env = {**os.environ, "MS_DEV_LAUNCH_BLOCKING": "1", "GLOG_v": "3",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", f"--log_dir={log_dir}", "--join=True", "--cluster_time_out=120",
           "python", "-m", "omni_fast.train", *args]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = b"(timed out)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # msrun, its scheduler and workers share this process group
        except ProcessLookupError:
            pass
        proc.wait()
    logs = {p.name: p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log"))}
    assert proc.returncode == 0, f"msrun failed ({proc.returncode}):\n{out.decode()[-3000:]}\n" + "\n".join(
        f"--- {name}\n{text[-4000:]}" for name, text in logs.items()
    )
    return logs["worker_0.log"]


def losses(save_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def assert_weights_close(got: dict, want: dict, rtol: float) -> None:
    assert set(got) == set(want)
    for name in want:
        assert_rel_close(np.asarray(got[name], np.float64), np.asarray(want[name], np.float64), rtol, name)


def in_process(flags: str) -> list[float]:
    """The single-process reference run; returns its losses."""
    trainer = build_trainer(parse_args(flags.split()))
    trainer.train()
    return [m.loss for m in trainer.history]


# Adam turns round-off in a near-zero gradient into a full +-lr step (k_proj biases have an exactly zero gradient:
# softmax ignores a shift shared by all keys); a larger epsilon keeps those entries comparable at fp32 round-off.
COMMON = "--no-jit --micro-batch-size 1 --lr 1e-3 --lr-decay-style constant --adam-eps 1e-4 --seed 7"


@pytest.mark.slow
def test_data_parallel_equals_accumulation_and_resumes_with_a_sharded_optimizer(tmp_path):
    data = demo_root() / "data.json"
    flags = f"{COMMON} --mm-data {data} --mm-model {TINY} --global-batch-size 2 --train-iters 3"
    ref = tmp_path / "ref"
    want = in_process(f"{flags} --save {ref}")

    run = tmp_path / "dp"
    msrun([*flags.split(), "--save", str(run), "--save-interval", "2"], tmp_path)
    assert_rel_close(losses(run), want, 1e-6, "losses, data parallel 2 vs accumulation 2")
    final = load_file(str(run / "iter_0000003" / "mp_rank_00" / "model.safetensors"))
    assert_weights_close(final, load_file(str(ref / "iter_0000003" / "mp_rank_00" / "model.safetensors")), 1e-5)

    # Resume the same run from iteration 2, this time with the optimizer state sharded over the two ranks.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "iter_0000003")
    (resumed / "latest_checkpointed_iteration.txt").write_text("2\n")
    (resumed / "metrics.jsonl").unlink()
    log = msrun([*flags.split(), "--load", str(resumed), "--save", str(resumed), "--use-distributed-optimizer"],
                tmp_path)
    assert "resumed from" in log and "at iteration 2" in log
    assert_rel_close(losses(resumed), losses(run)[2:], 1e-6, "loss after the resume")
    rank_dir = resumed / "iter_0000003" / "mp_rank_00"
    assert_weights_close(load_file(str(rank_dir / "model.safetensors")), final, 1e-6)
    shards = [load_file(str(rank_dir / f"optimizer_dp_{r:03d}.safetensors")) for r in range(2)]
    assert not (rank_dir / "optimizer.safetensors").exists()
    assert set(shards[0]) & set(shards[1]) == {"step"} and min(len(s) for s in shards) > 1
    unsharded = load_file(str(run / "iter_0000003" / "mp_rank_00" / "optimizer.safetensors"))
    assert_weights_close({**shards[0], **shards[1]}, unsharded, 1e-6)


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory):
    """Pipeline size 1 on the tiny preset: the losses and final weights every pipeline layout must reproduce."""
    save = tmp_path_factory.mktemp("pp_ref")
    flags = f"{COMMON} --mm-data {demo_root() / 'data.json'} --mm-model {TINY} --global-batch-size 4 --train-iters 2"
    want = in_process(f"{flags} --save {save}")
    return flags, want, read_mm_thinker(save, load_model_json(TINY).thinker)


@pytest.mark.slow
@pytest.mark.parametrize(
    "text_layers, extra",
    [([1, 1], []), ([0, 2], ["--enable-dummy-optimizer"])],
    ids=["text-from-stage-0", "frozen-first-stage"],
)
def test_two_pipeline_stages_equal_one(pipeline_reference, tmp_path, text_layers, extra):
    flags, want_losses, want_weights = pipeline_reference
    spec = spec_with(TINY, [2, 0], [2, 0], text_layers)
    model_json = tmp_path / "model_pp2.json"
    model_json.write_text(json.dumps(spec.raw))
    run = tmp_path / "pp2"
    flags = flags.replace(str(TINY), str(model_json))
    log = msrun([*flags.split(), "--pipeline-model-parallel-size", "2", "--save", str(run), *extra], tmp_path)
    assert "pipeline 2 x data parallel 1" in log
    assert_rel_close(losses(run), want_losses, 1e-6, f"losses, pipeline {text_layers} vs one stage")
    iteration = run / "iter_0000002"
    assert sorted(p.name for p in iteration.glob("mp_rank_*")) == ["mp_rank_00_000", "mp_rank_00_001"]
    # The stage files are MindSpeed-MM's layout: mm-convert's reader gives back the trained Thinker.
    assert_weights_close(read_mm_thinker(run, spec.thinker), want_weights, 1e-5)
    stage0_optimizer = load_file(str(iteration / "mp_rank_00_000" / "optimizer.safetensors"))
    if extra:
        assert "dummy optimizer" in log and set(stage0_optimizer) == {"step"}  # a frozen stage keeps no state
    else:
        assert any(k.startswith("exp_avg.model.layers.0.") for k in stage0_optimizer)
