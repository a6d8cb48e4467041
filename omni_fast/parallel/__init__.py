"""Scale-out on MindSpore's own distributed runtime: ``msrun`` processes, data parallel, pipeline stages.

``python -m omni_fast.train`` calls :func:`initialize` once the model structure is known and builds its trainer
with :func:`make_trainer`. Launched by ``msrun``, every process first validates the parallel settings (so a bad
``pipeline_num_layers`` stops every process, msrun's scheduler included, with the same message and before any
work), then joins the cluster; a plain process runs the single-process ``Trainer``.

Modules: ``layout`` (``pipeline_num_layers`` rules, stage ownership), ``runtime`` (cluster, groups, collectives,
point-to-point), ``stage`` (one stage's share of the forward), ``optimizer`` (distributed and dummy optimizers),
``training`` (the data-parallel and pipeline trainers, 1F1B, checkpoints).
"""

from __future__ import annotations

import logging

from omni_fast.config.mm_model import ModelSpec
from omni_fast.config.train_config import TrainConfig
from omni_fast.parallel.layout import PipelineLayout, check_dummy_optimizer, validate_pipeline_layout
from omni_fast.parallel.runtime import (
    ParallelContext,
    join_cluster,
    launched_by_msrun,
    launched_world_size,
    single_process_context,
)
from omni_fast.parallel.training import DataParallelTrainer, PipelineTrainer, make_trainer

logger = logging.getLogger("omni_fast.parallel")

_context: ParallelContext | None = None


def validate(config: TrainConfig, spec: ModelSpec, world_size: int) -> PipelineLayout:
    """Every parallel setting against the process count and the model, before any work; ``ValueError`` naming it."""
    size = config.pipeline_model_parallel_size
    if world_size % size:
        raise ValueError(
            f"--pipeline-model-parallel-size {size} does not divide the {world_size} process(es) launched "
            f"({'msrun --worker_num' if launched_by_msrun() else 'a plain python process is 1; launch with msrun'})"
        )
    layout = validate_pipeline_layout(spec, size)
    if size > 1:
        check_dummy_optimizer(layout, spec.freeze, config.enable_dummy_optimizer)
    return layout


def initialize(config: TrainConfig, spec: ModelSpec) -> ParallelContext:
    """Validate, then (under msrun) join the cluster; returns this process's context (also kept for
    :func:`current`). In msrun's scheduler process this never returns."""
    global _context
    layout = validate(config, spec, launched_world_size())
    if not launched_by_msrun():
        if config.use_distributed_optimizer:
            logger.info("--use-distributed-optimizer with one process: nothing to shard")
        _context = single_process_context(layout)
    else:
        _context = join_cluster(layout)
    return _context


def current() -> ParallelContext | None:
    """The context :func:`initialize` made in this process, or None."""
    return _context

__all__ = [
    "DataParallelTrainer",
    "ParallelContext",
    "PipelineLayout",
    "PipelineTrainer",
    "current",
    "initialize",
    "make_trainer",
    "validate",
    "validate_pipeline_layout",
]
