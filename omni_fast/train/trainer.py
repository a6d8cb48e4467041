"""The training loop: micro-batches -> gradients -> AdamW, with loss modes, clipping, NaN policy, checkpoints, logs.

A ``Trainer`` is built from a ``TrainConfig`` (the flags), a ``ModelSpec`` (model.json), a model and a dataset of
encoded samples with its collate function. One optimizer step:

1. the sampler gives this rank's micro-batches of the global batch (resumable from the consumed-sample count);
2. each micro-batch is collated, planned on the host (``prepare_batch``) and run forward+backward (``ms.jit``), with
   per-token loss weights that implement the loss mode; gradients are summed in float32;
3. the global gradient norm is checked (NaN/inf -> the policy) and clipped, and AdamW updates the trainable params;
4. metrics are logged every ``--log-interval`` steps (console and JSON lines), checkpoints every ``--save-interval``.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor

from omni_fast.config.mm_model import ModelSpec, model_json_from_spec
from omni_fast.config.train_config import TrainConfig
from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.model.flops import training_flops
from omni_fast.ops.library import host_module
from omni_fast.train import checkpoint as ckpt
from omni_fast.train.loss import loss_weights, valid_targets
from omni_fast.train.optim import AdamW, global_grad_norm, learning_rate
from omni_fast.train.sampler import GlobalBatchSampler

logger = logging.getLogger("omni_fast.train")

# Which parameters each model.json module owns (prefixes of the Thinker's parameter names).
MODULE_PREFIXES = {
    "vision_encoder": ("visual.patch_embed.", "visual.blocks."),
    "vision_projector": ("visual.merger.",),
    "audio_encoder": ("audio_tower.",),
    "text_decoder": ("model.", "lm_head."),
}


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (e.g. a NaN loss under --nan-policy stop)."""


@dataclass
class StepMetrics:
    iteration: int
    consumed_samples: int
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    valid_tokens: int
    padded_tokens: int
    seconds: float
    sample_ids: list[Any]
    compiled: bool = False  # the step traced and compiled its graph for a batch shape not seen before
    flops: float | None = None  # matmul FLOPs of the step's forward + backward (omni_fast.model.flops), if known


def apply_freeze(model: Qwen2_5OmniThinker, freeze: dict[str, bool]) -> dict[str, int]:
    """Mark frozen modules' parameters ``requires_grad=False``; returns trainable parameter counts per module."""
    counts = dict.fromkeys(MODULE_PREFIXES, 0)
    for name, param in model.parameters_and_names():
        module = next(m for m, prefixes in MODULE_PREFIXES.items() if name.startswith(prefixes))
        if name == "audio_tower.audio_bos_eos_token.weight":
            param.requires_grad = False  # never used by the forward (transformers gives it no gradient)
            continue
        param.requires_grad = not freeze[module]
        if param.requires_grad:
            counts[module] += int(np.prod(param.shape))
    return counts


def apply_recompute(model: Qwen2_5OmniThinker, recompute: dict[str, dict[str, Any]]) -> dict[str, int]:
    """model.json's ``recompute_*`` keys as MindSpore recomputation (activations of the marked cells are recomputed
    in the backward instead of kept), Megatron's meaning: granularity ``full`` recomputes whole layers —
    method ``uniform`` all of them, ``block`` the first ``recompute_num_layers`` — and ``selective`` only the
    attention of every layer. Returns the number of layers marked per module."""
    towers = {
        "vision_encoder": (model.visual.blocks, "attn"),
        "audio_encoder": (model.audio_tower.layers, "self_attn"),
        "text_decoder": (model.model.layers, "self_attn"),
    }
    marked = {}
    for module, keys in recompute.items():
        if module not in towers:
            raise ValueError(f"model.json {module}: recompute_* keys are supported on the encoders and text_decoder")
        layers, attention = towers[module]
        granularity = keys.get("recompute_granularity", "full")
        method = keys.get("recompute_method", "uniform")
        if granularity not in ("full", "selective") or method not in ("uniform", "block"):
            raise ValueError(
                f"model.json {module}: recompute_granularity {granularity!r} / recompute_method {method!r} "
                "(expected full|selective and uniform|block)"
            )
        count = len(layers)
        if granularity == "full" and method == "block":
            count = min(int(keys.get("recompute_num_layers", count)), count)
        for layer in list(layers)[:count]:
            (getattr(layer, attention) if granularity == "selective" else layer).recompute()
        marked[module] = count
    return marked


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        spec: ModelSpec,
        model: Qwen2_5OmniThinker,
        dataset: Sequence[Any],
        collate: Callable[[list[Any]], dict[str, Any]],
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        self.config = config
        self.spec = spec
        self.model = model
        self.dataset = dataset
        self.collate = collate
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.is_logging_rank = dp_rank == 0
        gbs = config.global_batch_size or config.micro_batch_size * dp_size
        if gbs % (config.micro_batch_size * dp_size):
            raise ValueError(
                f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {config.micro_batch_size} x "
                f"data-parallel size {dp_size}"
            )
        self.global_batch_size = gbs
        self.accumulation_steps = gbs // (config.micro_batch_size * dp_size)
        self.sampler = GlobalBatchSampler(len(dataset), gbs, seed=config.seed, dp_rank=dp_rank, dp_size=dp_size)
        self.trainable_counts = apply_freeze(model, spec.freeze)
        self.recomputed_layers = apply_recompute(model, spec.recompute)
        params = self._trainable_params()
        self.optimizer = self._build_optimizer(params)
        self.params = params
        self.iteration = 0
        self.consumed_samples = 0
        self.history: list[StepMetrics] = []
        self.nan_steps = 0
        self._graph_shapes: set[tuple] = set()  # argument shapes the jit step has compiled for
        self._build_step_functions()
        warmup = (
            round(config.lr_warmup_fraction * config.train_iters)
            if config.lr_warmup_fraction is not None
            else config.lr_warmup_iters
        )
        self.warmup_steps = warmup
        self.decay_steps = config.lr_decay_iters or config.train_iters

    # Hooks for omni_fast.parallel: which parameters this process trains, and with what.
    def _trainable_params(self) -> list:
        return self.model.trainable_params()

    def _build_optimizer(self, params: list) -> AdamW:
        c = self.config
        return AdamW(params, beta1=c.adam_beta1, beta2=c.adam_beta2, eps=c.adam_eps, weight_decay=c.weight_decay)

    # ------------------------------------------------------------------ compiled pieces

    def _build_step_functions(self) -> None:
        model = self.model

        def loss_fn(*args):
            return model.compute(*args)[1]

        grad_fn = ms.value_and_grad(loss_fn, None, self.params)

        def forward_backward(*args):
            return grad_fn(*args)

        def accumulate(total, grads):
            return tuple(t + g.astype(ms.float32) for t, g in zip(total, grads))

        def grad_norm(grads):
            return global_grad_norm(grads)

        optimizer = self.optimizer

        def update(grads, scale, lr_wd, step_size, bc2_sqrt):
            return optimizer(grads, scale, lr_wd, step_size, bc2_sqrt)

        compile_ = ms.jit if self.config.jit else (lambda f: f)
        self.forward_backward = compile_(forward_backward)
        self.accumulate = compile_(accumulate)
        self.grad_norm = compile_(grad_norm)
        self.update = compile_(update)

    # ------------------------------------------------------------------ one step

    def lr_at(self, step: int) -> float:
        c = self.config
        return learning_rate(
            step,
            lr=c.lr,
            min_lr=c.min_lr,
            warmup_steps=self.warmup_steps,
            decay_steps=self.decay_steps,
            style=c.lr_decay_style,
        )

    def accumulate_gradients(self, batches: list[dict[str, Any]]) -> tuple[float, tuple, int, int]:
        """Forward+backward over one step's micro-batches: (reported loss, summed grads, valid, padded tokens)."""
        labels = [np.asarray(b["labels"]) for b in batches]
        local_valid = int(sum(valid_targets(lab).sum() for lab in labels))
        global_valid = self._all_reduce_count(local_valid)
        weights = loss_weights(labels, self.config.loss_mode, dp_size=self.dp_size, global_valid=global_valid)
        total_loss, grads_sum, padded = 0.0, None, 0
        for batch, w in zip(batches, weights):
            prepared = self.model.prepare_batch(**{k: v for k, v in batch.items() if k != "sample_ids"})
            padded += int(prepared.input_ids.size)
            arguments = prepared.arguments()
            self._note_graph_shapes(arguments)
            loss, grads = self.forward_backward(*arguments, Tensor(w))
            total_loss += float(loss.asnumpy())
            # mutable: a tuple argument to a jit function would otherwise be a compile-time constant
            grads_sum = grads if grads_sum is None else self.accumulate(ms.mutable(grads_sum), ms.mutable(grads))
        grads_sum = ms.mutable(self._all_reduce_grads(grads_sum))
        return self._all_reduce_scalar(total_loss), grads_sum, global_valid, self._all_reduce_count(padded)

    def _note_graph_shapes(self, arguments: tuple) -> None:
        """Under ms.jit a batch whose argument shapes are new compiles a graph (seconds, against milliseconds for a
        step): remember the shapes, so that a step that adds some is flagged in the log and left out of the summary's
        throughput."""
        if self.config.jit:
            self._graph_shapes.add(tuple(_shape_key(a) for a in arguments))

    def _model_flops(self, batches: list[dict[str, Any]]) -> float | None:
        """Matmul FLOPs of this process's forward + backward on ``batches``, given which modules are trained."""
        trained = {module: count > 0 for module, count in self.trainable_counts.items()}
        return sum(training_flops(self.model.config, batch, trained) for batch in batches)

    def train_step(self) -> StepMetrics:
        c = self.config
        start = time.perf_counter()
        micro_indices = self.sampler.rank_micro_batches(self.consumed_samples, c.micro_batch_size)
        batches = [self.collate([self.dataset[int(i)] for i in idx]) for idx in micro_indices]
        sample_ids = [sid for b in batches for sid in b.get("sample_ids", [])]
        flops = self._model_flops(batches)
        known_shapes = len(self._graph_shapes)
        loss, grads, valid_tokens, padded_tokens = self.accumulate_gradients(batches)
        norm = float(self.grad_norm(grads).asnumpy())
        lr = self.lr_at(self.iteration + 1)
        skipped = not (math.isfinite(norm) and math.isfinite(loss))
        if skipped:
            self.nan_steps += 1
            logger.warning(
                "iteration %d: non-finite loss %s / grad norm %s on samples %s; %s",
                self.iteration + 1,
                loss,
                norm,
                sample_ids,
                "stopping (--nan-policy stop)" if c.nan_policy == "stop" else "update skipped (--nan-policy skip)",
            )
            if c.nan_policy == "stop":
                raise TrainingStopped(f"non-finite loss at iteration {self.iteration + 1} on samples {sample_ids}")
        else:
            scale = min(1.0, c.clip_grad / (norm + 1e-6)) if c.clip_grad > 0 else 1.0
            self.update(grads, Tensor(np.float32(scale)), *self.optimizer.host_scalars(lr))
        self.iteration += 1
        self.consumed_samples += self.global_batch_size
        return StepMetrics(
            iteration=self.iteration,
            consumed_samples=self.consumed_samples,
            loss=loss,
            grad_norm=norm,
            lr=lr,
            skipped=skipped,
            valid_tokens=valid_tokens,
            padded_tokens=padded_tokens,
            seconds=time.perf_counter() - start,
            sample_ids=sample_ids,
            compiled=len(self._graph_shapes) > known_shapes,
            flops=flops,
        )

    # Data-parallel hooks: identity in a single process; the parallel package overrides them.
    def _all_reduce_grads(self, grads: tuple) -> tuple:
        return grads

    def _all_reduce_scalar(self, value: float) -> float:
        return value

    def _all_reduce_count(self, value: int) -> int:
        return value

    # ------------------------------------------------------------------ loop, logs, checkpoints

    def train(self) -> dict[str, Any]:
        c = self.config
        metrics_file = self._open_metrics()
        progress = self._progress_bar()
        run_start = time.perf_counter()
        gc_was_enabled = gc.isenabled()
        if c.gc_interval:
            # The process holds hundreds of thousands of long-lived objects (MindSpore, transformers' processors): a
            # collection the interpreter starts by itself inside a step scans them all (~0.2 s measured with
            # transformers imported) and lands on a random step. Collect the young generations on our schedule.
            gc.collect()
            gc.disable()
        try:
            while self.iteration < c.train_iters:
                if c.gc_interval and self.iteration % c.gc_interval == 0:
                    gc.collect(1)
                m = self.train_step()
                self.history.append(m)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{m.loss:.4f}")
                if self.iteration % c.log_interval == 0 and self.is_logging_rank:
                    record = self._log_record(m)
                    logger.info(self._log_line(record))
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                if c.save and c.save_interval and self.iteration % c.save_interval == 0:
                    self.save()
        finally:
            if gc_was_enabled:
                gc.enable()
            if progress is not None:
                progress.close()
            if metrics_file is not None:
                metrics_file.close()
        if c.save and (not c.save_interval or self.iteration % c.save_interval):
            self.save()
        summary = self._summary(time.perf_counter() - run_start)
        if self.is_logging_rank:
            logger.info("summary: %s", json.dumps(summary))
            if c.loss_curve:
                self._write_loss_curve(Path(c.loss_curve))
        return summary

    def _progress_bar(self):
        if not (self.is_logging_rank and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.train_iters, initial=self.iteration, unit="step", leave=False)

    def _open_metrics(self):
        if not self.is_logging_rank:
            return None
        path = self.config.metrics_path or (str(Path(self.config.save) / "metrics.jsonl") if self.config.save else None)
        if path is None:
            return None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a")  # appended to on resume

    def _log_record(self, m: StepMetrics) -> dict[str, Any]:
        record = {
            "iteration": m.iteration,
            "consumed_samples": m.consumed_samples,
            "ms_per_iteration": round(m.seconds * 1000, 2),
            "lr": m.lr,
            "loss": m.loss,
            "grad_norm": m.grad_norm,
            "skipped": int(m.skipped),
            "nan_steps": self.nan_steps,
            "tokens_per_second": m.valid_tokens / m.seconds,
            "padded_tokens_per_second": m.padded_tokens / m.seconds,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "compiled": m.compiled,
            "mfu": self._mfu([m]),
        }
        if self.config.log_tps:
            record["tokens_per_sample"] = m.padded_tokens / self.global_batch_size
        return record

    def _log_line(self, r: dict[str, Any]) -> str:
        line = (
            f"iteration {r['iteration']:>6}/{self.config.train_iters} | consumed samples {r['consumed_samples']} | "
            f"elapsed time per iteration (ms): {r['ms_per_iteration']:.1f} | learning rate: {r['lr']:.6E} | "
            f"loss: {r['loss']:.6E} | grad norm: {r['grad_norm']:.4f} | skipped iterations: {r['skipped']} | "
            f"nan iterations: {r['nan_steps']}"
        )
        if self.config.log_tps:
            line += (
                f" | tokens per sample: {r['tokens_per_sample']:.1f} | tokens/s valid {r['tokens_per_second']:.0f}"
                f" padded {r['padded_tokens_per_second']:.0f}"
            )
        if self.config.log_tps and r["mfu"] is not None:
            line += f" | MFU {r['mfu']:.1%}"
        if r["compiled"]:
            line += " | compiled the step for a new batch shape"
        return line

    def _summary(self, wall_seconds: float) -> dict[str, Any]:
        steps = [m for m in self.history if not m.skipped]
        # Throughput of the steady state: not the steps that compiled a graph, nor the first (first calls of every
        # function, PyNative included); all steps when nothing else is left.
        timed = [m for m in steps[1:] if not m.compiled] or steps
        seconds = sum(m.seconds for m in timed) or float("nan")
        valid = sum(m.valid_tokens for m in timed)
        padded = sum(m.padded_tokens for m in timed)
        return {
            "iterations": self.iteration,
            "wall_seconds": round(wall_seconds, 2),
            "samples_per_second": len(timed) * self.global_batch_size / seconds,
            "tokens_per_second": valid / seconds,
            "padded_tokens_per_second": padded / seconds,
            "mfu_estimate": self._mfu(timed),
            "steps_timed": len(timed),
            "compile_steps": sum(m.compiled for m in self.history),
            "compile_seconds": round(sum(m.seconds for m in self.history if m.compiled), 2),
            "first_loss": self.history[0].loss if self.history else None,
            "last_loss": self.history[-1].loss if self.history else None,
            "nan_steps": self.nan_steps,
        }

    @staticmethod
    def _mfu(steps: list[StepMetrics]) -> float | None:
        """Model FLOPs utilisation of ``steps``: their matmul FLOPs per second over the cores' fp32 FMA ceiling."""
        if not steps or any(m.flops is None for m in steps):
            return None
        return sum(m.flops for m in steps) / sum(m.seconds for m in steps) / machine_peak_flops()

    def _write_loss_curve(self, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.warning("--loss-curve %s: matplotlib is not installed; no plot written", path)
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([m.iteration for m in self.history], [m.loss for m in self.history])
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    # ------------------------------------------------------------------ checkpoints

    def rank_dir(self) -> str:
        return ckpt.rank_dir_name(0, 1)

    def save(self) -> Path:
        c = self.config
        state = ckpt.TrainerState(
            iteration=self.iteration, consumed_samples=self.consumed_samples, args=dataclasses.asdict(c)
        )
        path = ckpt.save_checkpoint(
            Path(c.save),
            self.iteration,
            rank_dir=self.rank_dir(),
            write_weights=self._write_weights,
            optimizer_state=None if c.no_save_optim else self.optimizer.state(),
            rng_state=None if c.no_save_rng else {"seed": c.seed, "iteration": self.iteration},
            state=state,
            update_latest=self.is_logging_rank,
        )
        if self.is_logging_rank:
            self.describe_model(path)
        logger.info("saved iteration %d to %s", self.iteration, path)
        return path

    def describe_model(self, iteration_path: Path) -> None:
        """model.json beside the weights, so that ``--load`` of this checkpoint needs no ``--mm-model``."""
        (iteration_path / "model.json").write_text(json.dumps(model_json_from_spec(self.spec), indent=2))

    def resume_from(self, iteration_path: Path) -> None:
        """Continue a run saved by ``save``: weights, then optimizer/RNG state unless --no-load-*."""
        rank_path = ckpt.load_rank_files(iteration_path, self.rank_dir())
        self.load_weights(self._read_weights(iteration_path, rank_path), str(rank_path))
        state = ckpt.load_trainer_state(rank_path)
        self.iteration = state.iteration
        self.consumed_samples = state.consumed_samples
        if not self.config.no_load_optim:
            self.optimizer.load_state(self._read_optimizer_state(rank_path))
        else:
            self.optimizer.step_count = 0
        if not self.config.no_load_rng:
            ckpt.load_rng_state(rank_path)  # the run has no random state beyond the seed; checked for presence
        logger.info(
            "resumed from %s at iteration %d (%d samples consumed)", rank_path, self.iteration, self.consumed_samples
        )

    # Weights in MindSpeed-MM's layout (what mm-convert reads and writes); omni_fast.parallel overrides the
    # writer for pipeline stages. Every rank builds the whole Thinker, so every rank reads all of it.
    def _write_weights(self, iteration_dir: Path) -> None:
        from omni_fast.convert import ParallelLayout, write_mm_thinker

        t = self.model.config
        layout = ParallelLayout((t.text.num_hidden_layers,), (t.vision.depth,), (t.audio.encoder_layers,))
        write_mm_thinker({n: p.asnumpy() for n, p in self.model.parameters_and_names()}, iteration_dir, t, layout)

    def _read_weights(self, iteration_path: Path, rank_path: Path) -> dict[str, Any]:
        from omni_fast.convert import read_mm_thinker

        iteration = ckpt.load_trainer_state(rank_path).iteration
        tensors = read_mm_thinker(iteration_path.parent, self.model.config, iteration=iteration)
        return {name: Tensor(value) for name, value in tensors.items()}

    def _read_optimizer_state(self, rank_path: Path) -> dict[str, Any]:
        return ckpt.load_optimizer_state(rank_path)

    def load_weights(self, tensors: dict[str, Any], source: str) -> None:
        params = dict(self.model.parameters_and_names())
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise ckpt.CheckpointError(f"{source}: {len(missing)} model tensors missing, e.g. {missing[:3]}")
        for name, param in params.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ckpt.CheckpointError(f"{source}: {name} has shape {value.shape}, model has {param.shape}")
            param.set_data(value if value.dtype == param.dtype else value.astype(param.dtype))


def _shape_key(value: Any) -> Any:
    """What a jit graph is specialised on for one argument: shape and dtype of tensors, inside tuples too."""
    if isinstance(value, Tensor):
        return tuple(value.shape), str(value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_key(v) for v in value)
    return value


@functools.cache
def machine_peak_flops() -> float:
    """This machine's fp32 FMA ceiling in FLOP/s (multiply-add chains on every core for 0.2 s; measured once)."""
    return host_module().fma_peak_gflops(0.2) * 1e9
