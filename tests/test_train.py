"""The trainer's maths and bookkeeping: AdamW vs torch, schedules, loss modes, resume, atomic saves, flags."""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from mindspore import Parameter, Tensor

from omni_fast.config.mm_model import ModelSpec, load_model_json
from omni_fast.config.train_config import TrainConfig, parse_args
from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.train import checkpoint as ckpt
from omni_fast.train.optim import AdamW, learning_rate
from omni_fast.train.setup import PRESETS
from omni_fast.train.trainer import Trainer


def text_dataset(n: int = 16, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        ids = rng.integers(0, 1000, int(rng.integers(12, 40)))
        labels = ids.copy()
        labels[: int(rng.integers(1, 8))] = -100  # a prompt that is not trained on
        samples.append({"id": i, "input_ids": ids, "labels": labels})
    return samples


def right_pad_collate(samples: list[dict]) -> dict:
    width = -(-max(len(s["input_ids"]) for s in samples) // 8) * 8
    ids = np.full((len(samples), width), 1000, np.int64)
    labels = np.full((len(samples), width), -100, np.int64)
    mask = np.zeros((len(samples), width), np.int64)
    for r, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[r, :n], labels[r, :n], mask[r, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sample_ids": [s["id"] for s in samples]}


def make_trainer(tmp_path=None, **flags) -> Trainer:
    cfg = load_model_json(PRESETS / "model_tiny.json").thinker
    model = Qwen2_5OmniThinker(cfg)
    model.init_random(seed=0)
    spec = ModelSpec.from_thinker(cfg)
    # PyNative by default: these tests check maths, and each new batch shape would cost a jit compile.
    settings = {"lr": 1e-3, "lr_warmup_iters": 1, "save": str(tmp_path) if tmp_path else None, "jit": False}
    config = TrainConfig(**{**settings, **flags})
    config.validate()
    return Trainer(config, spec, model, text_dataset(), right_pad_collate)


# ---------------------------------------------------------------- optimizer and schedule


def test_adamw_matches_torch_over_three_steps():
    rng = np.random.default_rng(0)
    shapes = [(6, 5), (5,), (3, 4, 2)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    ours = [Parameter(Tensor(v.copy()), name=f"p{i}") for i, v in enumerate(init)]
    opt = AdamW(ours, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    theirs = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in init]
    # Megatron convention, followed by ours: 1-D tensors take no weight decay.
    torch_opt = torch.optim.AdamW(
        [
            {"params": [p for p in theirs if p.ndim > 1]},
            {"params": [p for p in theirs if p.ndim == 1], "weight_decay": 0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
    )
    for lr, step_grads in zip((1e-2, 5e-3, 2e-3), grads):
        opt(ms.mutable(tuple(Tensor(g) for g in step_grads)), Tensor(np.float32(1.0)), *opt.host_scalars(lr))
        for group in torch_opt.param_groups:
            group["lr"] = lr
        for p, g in zip(theirs, step_grads):
            p.grad = torch.from_numpy(g)
        torch_opt.step()
    for o, t in zip(ours, theirs):
        assert_rel_close(o.asnumpy(), t.detach().numpy(), 1e-6, "param")


def test_adamw_keeps_fp32_master_for_low_precision_params():
    # bf16 on Ascend; MindSpore's CPU build cannot assign bf16, so the same path is exercised with fp16 here.
    value = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    p = Parameter(Tensor(value).astype(ms.float16), name="w")
    opt = AdamW([p], weight_decay=0.0)
    for _ in range(3):
        opt(ms.mutable((Tensor(np.full((3, 4), 1e-3, np.float32)),)), Tensor(np.float32(1.0)), *opt.host_scalars(1e-4))
    master = opt.state()["master.w"]
    # each step of 1e-4 is below fp16 resolution near 1, yet the fp32 master has moved by ~3e-4.
    assert p.dtype == ms.float16
    np.testing.assert_allclose(master, value.astype(np.float16).astype(np.float32) - 3e-4, atol=2e-6)
    np.testing.assert_array_equal(p.asnumpy(), master.astype(np.float16))


def test_learning_rate_schedules():
    kw = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "decay_steps": 110}
    assert learning_rate(5, style="cosine", **kw) == pytest.approx(0.5)
    assert learning_rate(10, style="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(60, style="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(110, style="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(60, style="linear", **kw) == pytest.approx(0.55)
    assert learning_rate(60, style="constant", **kw) == pytest.approx(1.0)
    assert learning_rate(500, style="linear", **kw) == pytest.approx(0.1)


# ---------------------------------------------------------------- loss modes


def _step_gradients(trainer: Trainer) -> tuple[float, list[np.ndarray]]:
    idx = trainer.sampler.rank_micro_batches(0, trainer.config.micro_batch_size)
    batches = [trainer.collate([trainer.dataset[int(i)] for i in b]) for b in idx]
    loss, grads, _, _ = trainer.accumulate_gradients(batches)
    return loss, [g.asnumpy() for g in grads]


@pytest.mark.parametrize("mode", ["per_token", "default"])
def test_per_token_mode_is_independent_of_the_micro_batch_split(mode):
    flags = {"calculate_per_token_loss": mode == "per_token", "global_batch_size": 4}
    results = [_step_gradients(make_trainer(micro_batch_size=mbs, **flags)) for mbs in (1, 2, 4)]
    same = all(
        abs(loss - results[0][0]) <= 1e-5 * abs(results[0][0])
        and all(np.abs(g - g0).max() <= 1e-4 * np.abs(g0).max() for g, g0 in zip(grads, results[0][1]))
        for loss, grads in results[1:]
    )
    # per-token: one normalisation over the global batch, whatever the split. default: a mean of micro-batch
    # means, which weights tokens differently when micro-batches hold different token counts.
    assert same == (mode == "per_token")


def test_per_sample_equals_default_with_one_sample_per_micro_batch():
    a = _step_gradients(make_trainer(micro_batch_size=1, global_batch_size=4))
    b = _step_gradients(make_trainer(micro_batch_size=1, global_batch_size=4, calculate_per_sample_loss=True))
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    for ga, gb in zip(a[1], b[1]):
        assert_rel_close(gb, ga, 1e-6)


# ---------------------------------------------------------------- checkpoints and resume


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    # the same schedule in all runs (as when a run is restarted with the same flags)
    flags = {"micro_batch_size": 2, "global_batch_size": 4, "save_interval": 3, "lr_decay_iters": 6, "jit": True}
    straight = make_trainer(tmp_path / "a", train_iters=6, **flags)
    straight.train()
    first = make_trainer(tmp_path / "b", train_iters=3, **flags)
    first.train()
    resumed = make_trainer(tmp_path / "b", train_iters=6, **flags)
    resumed.resume_from(tmp_path / "b" / "iter_0000003")
    resumed.train()
    assert [m.loss for m in straight.history] == [m.loss for m in first.history + resumed.history]
    assert ckpt.read_latest(tmp_path / "b") == "6"
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # appended on resume


def test_failed_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, train_iters=1, micro_batch_size=2, global_batch_size=2)
    trainer.train()  # saves iteration 1
    trainer.config.train_iters = 2

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_numpy", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous checkpoint"):
        trainer.train()
    assert ckpt.read_latest(tmp_path) == "1"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".iter", "iter"))) == ["iter_0000001"]
    fresh = make_trainer(tmp_path, train_iters=2, micro_batch_size=2, global_batch_size=2)
    fresh.resume_from(tmp_path / "iter_0000001")
    assert fresh.iteration == 1


def test_no_load_optim_starts_fresh_optimizer_state(tmp_path):
    trainer = make_trainer(tmp_path, train_iters=2, micro_batch_size=2, global_batch_size=2)
    trainer.train()
    again = make_trainer(tmp_path, train_iters=3, micro_batch_size=2, global_batch_size=2, no_load_optim=True)
    again.resume_from(tmp_path / "iter_0000002")
    assert again.optimizer.step_count == 0
    assert np.abs(again.optimizer.state()[next(iter(k for k in again.optimizer.state() if "exp_avg." in k))]).max() == 0


# ---------------------------------------------------------------- flags


def test_guide_script_flags_are_accepted():
    argv = (
        "--use-mcore-models --tensor-model-parallel-size 1 --micro-batch-size 1 --global-batch-size 2 "
        "--tokenizer-type NullTokenizer --vocab-size 152064 --seq-length 3072 --make-vocab-size-divisible-by 1 "
        "--normalization RMSNorm --use-fused-rmsnorm --swiglu --use-fused-swiglu --no-masked-softmax-fusion "
        "--lr 1.0e-5 --lr-decay-style cosine --weight-decay 0 --train-iters 10000 --lr-warmup-fraction 0.1 "
        "--clip-grad 0.0 --adam-beta1 0.9 --adam-beta2 0.999 --no-gradient-accumulation-fusion --seed 42 --bf16 "
        "--variable-seq-lengths --use-distributed-optimizer --no-load-optim --no-load-rng --no-save-optim "
        "--no-save-rng --num-workers 8 --distributed-timeout-minutes 600 --use-flash-attn --log-interval 1 "
        "--save-interval 10000 --eval-interval 10000 --eval-iters 5000 --ckpt-format torch --log-tps "
        "--distributed-backend nccl --ai-framework mindspore"
    ).split()
    parsed = parse_args(argv)
    c = parsed.config
    assert (c.global_batch_size, c.seq_length, c.lr, c.clip_grad, c.weight_decay) == (2, 3072, 1e-5, 0.0, 0.0)
    assert c.bf16 and c.log_tps and c.no_save_optim and c.use_flash_attn and c.lr_warmup_fraction == 0.1
    assert parsed.structural == {"vocab_size": 152064, "normalization": "RMSNorm", "swiglu": True}
    assert "ckpt_format" in parsed.no_effect and "use_mcore_models" in parsed.no_effect


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--calculate-per-sample-loss --calculate-per-token-loss", "--calculate-per-token-loss: cannot be combined"),
        ("--micro-batch-size 0", "--micro-batch-size: must be >= 1"),
        ("--lr 1e-5 --min-lr 1e-4", "--min-lr: 0.0001 is above --lr"),
        ("--lr-warmup-fraction 1.5", "--lr-warmup-fraction: must be in"),
        ("--tensor-model-parallel-size 2", "--tensor-model-parallel-size: only 1"),
    ],
)
def test_bad_flags_stop_before_any_work(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv.split())


def test_global_batch_must_divide():
    with pytest.raises(ValueError, match="--global-batch-size 3 is not a multiple of --micro-batch-size 2"):
        make_trainer(micro_batch_size=2, global_batch_size=3)


def test_nan_policy_skip_and_stop():
    trainer = make_trainer(micro_batch_size=2, global_batch_size=2, train_iters=1)
    trainer.dataset[0]["labels"] = trainer.dataset[0]["labels"]  # no-op; the NaN comes from a poisoned weight
    before = {n: p.asnumpy().copy() for n, p in trainer.model.parameters_and_names()}
    trainer.model.lm_head.weight.set_data(Tensor(np.full(trainer.model.lm_head.weight.shape, math.nan, np.float32)))
    m = trainer.train_step()
    assert m.skipped and trainer.nan_steps == 1
    assert np.array_equal(
        trainer.model.model.layers[0].mlp.up_proj.weight.asnumpy(), before["model.layers.0.mlp.up_proj.weight"]
    )
    trainer.config.nan_policy = "stop"
    from omni_fast.train.trainer import TrainingStopped

    with pytest.raises(TrainingStopped, match="non-finite loss at iteration 2 on samples"):
        trainer.train_step()


def test_recompute_keys_mark_layers_and_keep_gradients():
    plain = _step_gradients(make_trainer(micro_batch_size=2, global_batch_size=2, jit=True))
    trainer = make_trainer(micro_batch_size=2, global_batch_size=2, jit=True)
    from omni_fast.train.trainer import apply_recompute

    marked = apply_recompute(
        trainer.model,
        {
            "text_decoder": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
            "vision_encoder": {"recompute_granularity": "selective"},
        },
    )
    assert marked == {"text_decoder": 1, "vision_encoder": 2}
    recomputed = _step_gradients(trainer)
    assert recomputed[0] == pytest.approx(plain[0], rel=1e-6)
    for a, b in zip(recomputed[1], plain[1]):
        assert_rel_close(a, b, 1e-5)
    with pytest.raises(ValueError, match="recompute_granularity 'layer'"):
        apply_recompute(trainer.model, {"audio_encoder": {"recompute_granularity": "layer"}})


def test_steps_that_compile_a_new_batch_shape_are_flagged_and_left_out_of_throughput():
    """Under ms.jit a new batch width compiles the step (seconds): the log says so and the summary's throughput and
    MFU count only the steady steps."""
    trainer = make_trainer(jit=True, train_iters=4, micro_batch_size=1, global_batch_size=1, log_tps=True)
    widths = iter([16, 16, 24, 16])

    def fixed_width(samples: list[dict]) -> dict:
        ids = np.resize(samples[0]["input_ids"], (1, next(widths)))
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy(), "sample_ids": [0]}

    trainer.collate = fixed_width
    summary = trainer.train()
    assert [m.compiled for m in trainer.history] == [True, False, True, False]
    assert summary["compile_steps"] == 2 and summary["steps_timed"] == 2
    steady = [trainer.history[1], trainer.history[3]]
    assert summary["samples_per_second"] == pytest.approx(2 / sum(m.seconds for m in steady))
    assert 0 < summary["mfu_estimate"] < 1
    record = trainer._log_record(trainer.history[2])
    assert record["compiled"] and 0 < record["mfu"] < 1
    assert "compiled the step for a new batch shape" in trainer._log_line(record)


def test_garbage_collection_runs_between_steps_on_schedule(monkeypatch):
    """--gc-interval: automatic collection is off during training, young generations are collected every N steps
    (never inside a step), and the interpreter's setting is restored afterwards; 0 leaves collection automatic."""
    import gc

    trainer = make_trainer(micro_batch_size=2, global_batch_size=2, train_iters=5, gc_interval=2)
    events: list = []
    real_collect, real_step = gc.collect, trainer.train_step
    monkeypatch.setattr(gc, "collect", lambda generation=2: events.append(("collect", generation)) or 0)

    def step():
        events.append(("step", gc.isenabled()))
        return real_step()

    trainer.train_step = step
    assert gc.isenabled()
    trainer.train()
    assert gc.isenabled()
    # a full collection before the loop, then generation 1 before steps 1, 3 and 5; every step ran with gc off
    assert events == [("collect", 2), ("collect", 1), ("step", False), ("step", False), ("collect", 1),
                      ("step", False), ("step", False), ("collect", 1), ("step", False)]  # fmt: skip
    events.clear()
    trainer.config.gc_interval, trainer.config.train_iters = 0, 6
    summary = trainer.train()
    assert events == [("step", True)]
    assert 0 < summary["mfu_estimate"] < 1  # model FLOPs over the cores' FMA ceiling: a fraction, never above 1
    monkeypatch.setattr(gc, "collect", real_collect)
    with pytest.raises(ValueError, match="--gc-interval: must be >= 0"):
        parse_args(["--gc-interval", "-1"])
