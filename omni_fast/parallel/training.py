"""Trainers for a run over several processes: data parallel, and pipeline stages with a 1F1B schedule.

Both subclass ``omni_fast.train.trainer.Trainer`` and keep its step (sampler, loss modes, clipping, NaN policy,
AdamW, logs); they override its hooks:

* :class:`DataParallelTrainer` (``--pipeline-model-parallel-size 1``): every rank runs the whole model on its
  rank-strided share of the global batch (``GlobalBatchSampler``); gradients are summed over the data-parallel group
  with ``ops.AllReduce`` (the loss weights already divide by the data-parallel size, as Megatron's mean does), the
  loss and the token counts are summed exactly (``all_gather_object``). The compiled (``ms.jit``) forward/backward
  of the single-process trainer is used unchanged.
* :class:`PipelineTrainer`: each rank runs one stage (``stage.py``) of one pipeline replica, in PyNative (send/recv
  between stages exist only there). One optimizer step runs the accumulation micro-batches through a 1F1B schedule:
  stage ``s`` of ``P`` first runs ``P - s - 1`` forwards, then alternates one forward and one backward, then drains
  the remaining backwards; at most ``P - s`` micro-batches are in flight on a stage and every stage stays busy once
  the pipeline is full. A non-last stage keeps only the received inputs of its in-flight micro-batches and recomputes
  its forward inside the backward (like ``recompute_granularity: full``), because MindSpore differentiates a function
  by running it; the last stage runs forward and backward in one call. Stages whose parameters are all frozen, and
  every stage before them, skip the backward altogether (MindSpeed-MM's dummy optimizer does the same).

Checkpoints (``--save``), all ranks cooperating so that a crash never leaves a half-written iteration as latest:
``SAVE/.iter_NNNNNNN.parallel/`` is filled by every rank that owns a part, then rank 0 renames it into place and
updates ``latest_checkpointed_iteration.txt`` last (``checkpoint.publish_iteration``):

* ``mp_rank_00[_PPP]/`` per pipeline stage, written by the stage's data-parallel rank 0: ``trainer_state.json``,
  ``rng.json``, ``optimizer.safetensors`` (the stage's AdamW state), and the weights ``model.safetensors``: with one
  stage the trainer's own file; with several, each stage's file written by ``omni_fast.convert.write_mm_thinker``
  for that stage alone (MindSpeed-MM names, layer numbers restarting at 0 on each stage: the files ``mm-convert``
  reads and writes);
* with ``--use-distributed-optimizer``, ``optimizer_dp_RRR.safetensors`` from each data-parallel rank (its shard)
  instead of ``optimizer.safetensors``. Resuming reads whichever optimizer files are there, so a run may resume with
  or without sharding, or with another data-parallel size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import ParameterTuple, Tensor, ops
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy

from omni_fast.config.mm_model import ModelSpec
from omni_fast.config.train_config import TrainConfig
from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.parallel.optimizer import DistributedOptimizer, DummyOptimizer
from omni_fast.parallel.runtime import ParallelContext, PointToPoint
from omni_fast.parallel.stage import PipelineStage
from omni_fast.train import checkpoint as ckpt
from omni_fast.train.loss import loss_weights, valid_targets
from omni_fast.train.optim import global_grad_norm
from omni_fast.train.trainer import Trainer

logger = logging.getLogger("omni_fast.train")

SHARD_FILE = "optimizer_dp_{:03d}.safetensors"


class OptimizerFiles(Mapping):
    """Every ``optimizer*.safetensors`` of a rank directory as one mapping, each tensor read when asked for.

    Holds the unsharded file or the shards of any data-parallel size; a rank reads only its own names.
    """

    def __init__(self, rank_path: Path):
        files = sorted(rank_path.glob("optimizer*.safetensors"))
        if not files:
            raise ckpt.CheckpointError(
                f"{rank_path}: no optimizer state (the checkpoint was saved with --no-save-optim; pass --no-load-optim)"
            )
        self._where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), "numpy") as handle:
                for key in handle.keys():
                    self._where.setdefault(key, file)

    def __getitem__(self, key: str) -> np.ndarray:
        with safe_open(str(self._where[key]), "numpy") as handle:
            return handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class DataParallelTrainer(Trainer):
    """The trainer of one rank of a data-parallel run (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        spec: ModelSpec,
        model: Qwen2_5OmniThinker,
        dataset: Sequence[Any],
        collate: Callable[[list[Any]], dict[str, Any]],
        ctx: ParallelContext,
    ):
        self.ctx = ctx
        super().__init__(config, spec, model, dataset, collate, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
        self.is_logging_rank = ctx.rank == 0

    def _compile(self, fn: Callable) -> Callable:
        return ms.jit(fn) if self.config.jit else fn

    def _build_optimizer(self, params: list) -> Any:
        if self.config.use_distributed_optimizer:
            return DistributedOptimizer(params, self.ctx, super()._build_optimizer, self._compile)
        return super()._build_optimizer(params)

    def _build_step_functions(self) -> None:
        super()._build_step_functions()
        if self.config.use_distributed_optimizer:
            self.update = self.optimizer  # its update broadcasts parameters: Python around a compiled AdamW

    def _all_reduce_grads(self, grads: tuple) -> tuple:
        return tuple(self.ctx.all_reduce(g, self.ctx.dp_group) for g in grads)

    def _all_reduce_scalar(self, value: float) -> float:
        return sum(self.ctx.gather_objects(value, self.ctx.dp_group))

    def _all_reduce_count(self, value: int) -> int:
        return sum(self.ctx.gather_objects(value, self.ctx.dp_group))

    # ------------------------------------------------------------------ checkpoints

    def rank_dir(self) -> str:
        return ckpt.rank_dir_name(self.ctx.pp_rank, self.ctx.pp_size)

    def save(self) -> Path:
        c, ctx = self.config, self.ctx
        root = Path(c.save)
        staging = root / f".{ckpt.iteration_dir_name(self.iteration)}.parallel"
        if ctx.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run that died while saving
            staging.mkdir(parents=True)
        ctx.barrier()
        rank_path = staging / self.rank_dir()
        sharded = c.use_distributed_optimizer and not c.no_save_optim
        final = root / ckpt.iteration_dir_name(self.iteration)
        try:
            rank_path.mkdir(exist_ok=True)
            if ctx.dp_rank == 0:
                ckpt.write_rank_files(
                    rank_path,
                    optimizer_state=None if c.no_save_optim or sharded else self.optimizer.state(),
                    rng_state=None if c.no_save_rng else {"seed": c.seed, "iteration": self.iteration},
                    state=ckpt.TrainerState(self.iteration, self.consumed_samples, dataclasses.asdict(c)),
                )
                self._write_weights(staging)
            if sharded:
                state = self.optimizer.state()
                save_numpy({k: np.ascontiguousarray(v) for k, v in state.items()},
                           str(rank_path / SHARD_FILE.format(ctx.dp_rank)))
            ctx.barrier()
            if ctx.rank == 0:
                self.describe_model(staging)
                final = ckpt.publish_iteration(root, staging, self.iteration, update_latest=True)
                logger.info("saved iteration %d to %s", self.iteration, final)
        except OSError as err:
            raise ckpt.CheckpointError(
                f"rank {ctx.rank}: could not save iteration {self.iteration} under {staging} "
                f"({err.strerror or err}); the previous checkpoint in {root} is untouched"
            ) from err
        ctx.barrier()
        return final

    def _read_optimizer_state(self, rank_path: Path) -> Mapping[str, np.ndarray]:
        return OptimizerFiles(rank_path)


class PipelineTrainer(DataParallelTrainer):
    """The trainer of one pipeline stage of one data-parallel replica (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        spec: ModelSpec,
        model: Qwen2_5OmniThinker,
        dataset: Sequence[Any],
        collate: Callable[[list[Any]], dict[str, Any]],
        ctx: ParallelContext,
    ):
        self.stage = PipelineStage(model, ctx.layout, ctx.pp_rank)
        super().__init__(config, spec, model, dataset, collate, ctx)
        # Trainability per stage is the same on every rank (each builds the whole Thinker and applies model.json's
        # freeze); a stage runs a backward only if it, or a stage before it, trains something.
        trains = [bool(PipelineStage(model, ctx.layout, s).trainable_params()) for s in range(ctx.pp_size)]
        self.runs_backward = [any(trains[: s + 1]) for s in range(ctx.pp_size)]
        self.p2p = PointToPoint(model.compute_dtype)
        if config.jit:
            logger.info("pipeline stages run in PyNative (MindSpore's send/recv exist only there); --no-jit implied")
        frozen = [s for s, trained in enumerate(trains) if not trained]
        if frozen:
            logger.info("stage(s) %s hold only frozen parameters: dummy optimizer, no optimizer state", frozen)

    def _compile(self, fn: Callable) -> Callable:
        return fn  # the whole pipeline step runs in PyNative

    def _trainable_params(self) -> list:
        return self.stage.trainable_params()

    def _build_optimizer(self, params: list) -> Any:
        # initialize() already refused a frozen stage without --enable-dummy-optimizer, on every rank.
        return super()._build_optimizer(params) if params else DummyOptimizer()

    def _build_step_functions(self) -> None:
        ctx = self.ctx

        def grad_norm(grads: tuple) -> Tensor:
            local = float(global_grad_norm(grads).asnumpy()) if grads else 0.0
            return Tensor(np.float32(math.sqrt(sum(ctx.gather_objects(local * local, ctx.pp_group)))))

        def accumulate(total: tuple, grads: tuple) -> tuple:
            return tuple(t + g.astype(ms.float32) for t, g in zip(total, grads))

        self.grad_norm = grad_norm
        self.accumulate = accumulate
        self.update = self.optimizer

    # ------------------------------------------------------------------ one step

    def _differentiate(self, fn: Callable, carry: list[Tensor], inputs: bool, sens: list[Tensor] | None):
        """(value or None, input grads, parameter grads) of ``fn`` at ``carry``; ``sens`` None means ``fn`` is the
        scalar loss (value and gradients in one call), else the gradients flowing into ``fn``'s outputs."""
        params = self.params
        inputs = inputs and bool(carry)
        if not inputs and not params:  # nothing here needs a gradient
            return (fn(*carry) if sens is None else None), (), ()
        if sens is None:
            positions = tuple(range(len(carry))) if inputs else None
            value, grads = ms.value_and_grad(fn, positions, params or None)(*carry)
        else:
            value = None
            grad_op = ops.GradOperation(get_all=inputs, get_by_list=bool(params), sens_param=True)
            grads = grad_op(fn, ParameterTuple(params))(*carry, tuple(sens)) if params else grad_op(fn)(
                *carry, tuple(sens)
            )
        input_grads, param_grads = (grads[0], grads[1]) if inputs and params else (grads, ()) if inputs else ((), grads)
        if isinstance(input_grads, Tensor):  # value_and_grad returns a lone tensor for a single grad position
            input_grads = (input_grads,)
        return value, input_grads, param_grads

    def _model_flops(self, batches: list[dict[str, Any]]) -> None:
        """Not estimated: a stage runs an uneven share of the layers, so the whole model's count would mislead."""
        return None

    def accumulate_gradients(self, batches: list[dict[str, Any]]) -> tuple[float, tuple, int, int]:
        c, ctx, stage = self.config, self.ctx, self.stage
        labels = [np.asarray(b["labels"]) for b in batches]
        global_valid = self._all_reduce_count(int(sum(valid_targets(lab).sum() for lab in labels)))
        weights = loss_weights(labels, c.loss_mode, dp_size=self.dp_size, global_valid=global_valid)
        prepared = [self.model.prepare_batch(**{k: v for k, v in b.items() if k != "sample_ids"}) for b in batches]
        arguments = [p.arguments() for p in prepared]
        s, size, micro = ctx.pp_rank, ctx.pp_size, len(batches)
        prev_rank = ctx.global_rank(s - 1, ctx.dp_rank) if s > 0 else None
        next_rank = ctx.global_rank(s + 1, ctx.dp_rank) if s < size - 1 else None
        backward = self.runs_backward[s]
        send_input_grads = s > 0 and self.runs_backward[s - 1]
        saved: dict[int, Any] = {}
        totals: dict[str, Any] = {"loss": 0.0, "grads": None}

        def add_grads(grads: tuple) -> None:
            totals["grads"] = grads if totals["grads"] is None else self.accumulate(totals["grads"], grads)

        def forward(i: int) -> None:
            carry = self.p2p.recv(prev_rank) if prev_rank is not None else []
            expected = stage.input_keys(arguments[i])
            if len(carry) != len(expected):
                raise RuntimeError(f"stage {s} received {len(carry)} tensors for micro-batch {i}, expected {expected}")
            fn = stage.function(arguments[i], Tensor(weights[i]))
            if stage.is_last:
                value, input_grads, param_grads = self._differentiate(fn, carry, send_input_grads, None)
                totals["loss"] += float(value.asnumpy())
                saved[i] = (input_grads, param_grads)
            else:
                out = fn(*carry)
                self.p2p.send(out, next_rank, header=True)
                saved[i] = (carry, [tuple(o.shape) for o in out])

        def backward_step(i: int) -> None:
            if stage.is_last:
                input_grads, param_grads = saved.pop(i)
            else:
                carry, shapes = saved.pop(i)
                if not backward:
                    return
                sens = self.p2p.recv(next_rank, shapes)
                if sens:
                    fn = stage.function(arguments[i], Tensor(weights[i]))
                    _, input_grads, param_grads = self._differentiate(fn, carry, send_input_grads, sens)
                else:  # this stage sent nothing on for this micro-batch: its parameters took no part
                    input_grads, param_grads = (), tuple(ops.zeros(p.shape, ms.float32) for p in self.params)
            add_grads(tuple(param_grads))
            if send_input_grads:
                self.p2p.send(list(input_grads), prev_rank, header=False)

        warmup = min(size - s - 1, micro)
        for i in range(warmup):
            forward(i)
        for i in range(micro - warmup):
            forward(warmup + i)
            backward_step(i)
        for i in range(micro - warmup, micro):
            backward_step(i)
        self.p2p.wait()

        grads = self._all_reduce_grads(totals["grads"] if totals["grads"] is not None else ())
        loss = sum(ctx.gather_objects(totals["loss"] if stage.is_last else 0.0, ctx.world_group))
        padded = self._all_reduce_count(sum(int(p.input_ids.size) for p in prepared))
        return loss, ms.mutable(grads), global_valid, padded

    # ------------------------------------------------------------------ checkpoints

    def _write_weights(self, staging: Path) -> None:
        from omni_fast.convert import ParallelLayout, write_mm_thinker

        layout = self.ctx.layout
        write_mm_thinker(
            {p.name: p.asnumpy() for p in self.stage.parameters},
            staging,
            self.model.config,
            ParallelLayout(layout.text_decoder, layout.vision_encoder, layout.audio_encoder),
            stages=[self.ctx.pp_rank],
        )


def make_trainer(
    config: TrainConfig,
    spec: ModelSpec,
    model: Qwen2_5OmniThinker,
    dataset: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, Any]],
    ctx: ParallelContext | None,
) -> Trainer:
    """The trainer for this process: ``Trainer`` alone, else data parallel or a pipeline stage."""
    if ctx is None or ctx.world_size == 1:
        return Trainer(config, spec, model, dataset, collate)
    cls = PipelineTrainer if ctx.pp_size > 1 else DataParallelTrainer
    return cls(config, spec, model, dataset, collate, ctx)
