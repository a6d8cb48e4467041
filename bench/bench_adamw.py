"""The optimizer step on the 21.2M-parameter Thinker's tensors: AdamW update and global gradient norm, our fused
multi-tensor kernels vs the MindSpore composition they replace vs torch, in one run.

Rows per case (a case = update or gradient norm, one pytest-benchmark group):

* MindSpore kernel: ``AdamW`` / ``global_grad_norm`` on the ``cpu_kernel`` backend (one aot custom op for all
  tensors, the update in place), under ``ms.jit`` as the trainer runs it, and the update in PyNative as the
  pipeline-parallel trainer runs it;
* MindSpore reference: the same faces on the ``reference`` backend (the composition, several ops per tensor), jit;
* torch: ``torch.optim.AdamW(foreach=True)`` and ``(fused=True)``; ``torch.nn.utils.get_total_norm`` (foreach);
* the C++ sandbox on numpy (``omni_fast._C``): fast path vs scalar reference, without MindSpore in the way.

The step is memory-bound, so the derived metric is GB/s of compulsory traffic.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mindspore as ms
import numpy as np
import pytest
import torch
from bench_thinker import thinker_config_dict
from harness import MS_KERNEL, MS_KERNEL_JIT, SANDBOX_FAST, SANDBOX_SCALAR, check_close, ms_sync, run_budgeted
from mindspore import Parameter, Tensor, ops

from omni_fast.config.model_config import ThinkerConfig
from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.ops.adamw import GradSquaredSum, explain
from omni_fast.ops.library import host_module
from omni_fast.ops.reference import grad_squared_sum_reference
from omni_fast.train.optim import AdamW, global_grad_norm

LR, WEIGHT_DECAY, BETA1, BETA2, EPS = 1e-3, 0.1, 0.9, 0.999, 1e-8

MS_REFERENCE_JIT = "MindSpore reference (jit)"
TORCH_FOREACH = "torch AdamW foreach"
TORCH_FUSED = "torch AdamW fused"
TORCH_NORM = "torch get_total_norm (foreach)"
IMPLS = {
    "update": (MS_KERNEL_JIT, MS_KERNEL, MS_REFERENCE_JIT, TORCH_FOREACH, TORCH_FUSED, SANDBOX_FAST, SANDBOX_SCALAR),
    "grad norm": (MS_KERNEL_JIT, MS_REFERENCE_JIT, TORCH_NORM, SANDBOX_FAST, SANDBOX_SCALAR),
}
PEER = {"update": TORCH_FUSED, "grad norm": TORCH_NORM}
HEADLINE = {MS_KERNEL_JIT}

NOTE = (
    "Tensors: the trainable parameters of the 21.2M-parameter Thinker (bench_thinker.py's config), fp32, with "
    "random weights and gradients. Update = one AdamW step of every tensor (lr 1e-3, weight decay 0.1 on tensors "
    "of 2+ axes, betas 0.9/0.999, eps 1e-8, grad scale 1), in place; the state advances each round, which does not "
    "change the work. The MindSpore rows call the trainer's faces (`AdamW`, `global_grad_norm`) built under "
    "`OMNI_FAST_BACKEND` = the row's backend; the jit rows wrap them in `ms.jit` as the trainer does (gradients as "
    "an `ms.mutable` tuple) and wait for the graph by reading a parameter (update) or the result (norm). torch "
    "runs with its default threads; `get_total_norm` is what `clip_grad_norm_` computes. The sandbox calls "
    "`omni_fast._C.adamw_update / grad_squared_sum` on numpy arrays: fast path with OpenMP (2 threads, "
    "chunks of 32K elements), scalar reference single-threaded. Compulsory traffic per element: update reads the "
    "gradient and reads and writes weight, exp_avg and exp_avg_sq (28 bytes); norm reads the gradient (4 bytes). "
    "Before timing, every row's first step (or norm) is checked against the sandbox fast path (relative 1e-5), "
    "untimed."
)


@functools.cache
def param_shapes() -> tuple[tuple[int, ...], ...]:
    model = Qwen2_5OmniThinker(ThinkerConfig.from_dict(thinker_config_dict("21M")))
    return tuple(tuple(p.shape) for p in model.trainable_params())


@dataclass
class Case:
    weights: list[np.ndarray]
    grads: list[np.ndarray]
    decay: list[bool]
    want_weights: list[np.ndarray]  # after one step, by the sandbox fast path
    want_norm: float


@pytest.fixture(scope="module")
def case() -> Case:
    rng = np.random.default_rng(0)
    shapes = param_shapes()
    weights = [(rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)) for s in shapes]
    grads = [(rng.standard_normal(s, dtype=np.float32) * np.float32(1e-3)) for s in shapes]
    decay = [len(s) > 1 for s in shapes]
    state = Sandbox(weights, grads, decay)
    state.step(reference=False)
    want_norm = float(np.sqrt(host_module().grad_squared_sum(grads)))
    return Case(weights, grads, decay, state.weights, want_norm)


class Sandbox:
    """AdamW state on numpy arrays, stepped by the C++ sandbox."""

    def __init__(self, weights: list[np.ndarray], grads: list[np.ndarray], decay: list[bool]) -> None:
        self.weights = [w.copy() for w in weights]
        self.exp_avg = [np.zeros_like(w) for w in weights]
        self.exp_avg_sq = [np.zeros_like(w) for w in weights]
        self.grads, self.decay = grads, decay
        # step 1: bias corrections 1 - beta^1, as AdamW.host_scalars computes them
        self.scalars = {"lr_wd": LR * WEIGHT_DECAY, "step_size": LR / (1 - BETA1), "bc2_sqrt": (1 - BETA2) ** 0.5}

    def step(self, reference: bool) -> None:
        host_module().adamw_update(self.grads, self.weights, self.exp_avg, self.exp_avg_sq, [None] * len(self.grads),
                                   self.decay, **self.scalars, grad_scale=1.0, beta1=BETA1, beta2=BETA2, eps=EPS,
                                   reference=reference)  # fmt: skip


@contextlib.contextmanager
def backend_scope(forced: str | None) -> Iterator[None]:
    """``OMNI_FAST_BACKEND=forced`` (None: the dispatcher's choice) while the faces pick their backend."""
    previous = os.environ.pop("OMNI_FAST_BACKEND", None)
    if forced is not None:
        os.environ["OMNI_FAST_BACKEND"] = forced
    try:
        yield
    finally:
        os.environ.pop("OMNI_FAST_BACKEND", None)
        if previous is not None:
            os.environ["OMNI_FAST_BACKEND"] = previous


def _ms_update(impl: str, case: Case) -> tuple[Callable[[], Any], Callable[[], list[np.ndarray]]]:
    with backend_scope("reference" if impl == MS_REFERENCE_JIT else None):
        params = [Parameter(Tensor(w.copy()), name=f"p{i}") for i, w in enumerate(case.weights)]
        opt = AdamW(params, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WEIGHT_DECAY)
    assert opt.backend == ("reference" if impl == MS_REFERENCE_JIT else "cpu_kernel"), explain()
    grads = ms.mutable(tuple(Tensor(g) for g in case.grads))
    scalars = (Tensor(np.float32(1.0)), *opt.host_scalars(LR))

    def update(grads: tuple, *scalars: Tensor) -> bool:
        return opt(grads, *scalars)

    run = ms.jit(update) if impl != MS_KERNEL else update

    def step() -> None:
        run(grads, *scalars)
        ms_sync(params[-1])  # the update returns no tensor: reading a parameter waits for the graph

    return step, lambda: [p.asnumpy() for p in params]


def _torch_update(impl: str, case: Case) -> tuple[Callable[[], Any], Callable[[], list[np.ndarray]]]:
    params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in case.weights]
    for p, g in zip(params, case.grads):
        p.grad = torch.from_numpy(g)
    groups = [
        {"params": [p for p, d in zip(params, case.decay) if d]},
        {"params": [p for p, d in zip(params, case.decay) if not d], "weight_decay": 0.0},
    ]
    flavour = {"foreach": True} if impl == TORCH_FOREACH else {"fused": True}
    opt = torch.optim.AdamW(groups, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WEIGHT_DECAY, **flavour)
    return opt.step, lambda: [p.detach().numpy() for p in params]


def update_callable(impl: str, case: Case) -> tuple[Callable[[], Any], Callable[[], list[np.ndarray]]]:
    """(one step, read the weights) for ``impl``, on fresh state."""
    if impl in (MS_KERNEL_JIT, MS_KERNEL, MS_REFERENCE_JIT):
        return _ms_update(impl, case)
    if impl in (TORCH_FOREACH, TORCH_FUSED):
        return _torch_update(impl, case)
    if impl in (SANDBOX_FAST, SANDBOX_SCALAR):
        state = Sandbox(case.weights, case.grads, case.decay)
        return functools.partial(state.step, reference=impl == SANDBOX_SCALAR), lambda: state.weights
    raise ValueError(impl)


@ms.jit
def _jit_grad_norm(grads: tuple) -> Tensor:
    return global_grad_norm(grads)


@ms.jit
def _jit_grad_norm_composed(grads: tuple) -> Tensor:
    return ops.sqrt(grad_squared_sum_reference(grads))


def norm_callable(impl: str, case: Case) -> Callable[[], float]:
    if impl in (MS_KERNEL_JIT, MS_REFERENCE_JIT):
        grads = ms.mutable(tuple(Tensor(g) for g in case.grads))
        fn = _jit_grad_norm if impl == MS_KERNEL_JIT else _jit_grad_norm_composed
        return lambda: float(fn(grads).asnumpy())
    if impl == TORCH_NORM:
        grads = [torch.from_numpy(g) for g in case.grads]
        return lambda: float(torch.nn.utils.get_total_norm(grads, foreach=True))
    if impl in (SANDBOX_FAST, SANDBOX_SCALAR):
        c, scalar = host_module(), impl == SANDBOX_SCALAR
        return lambda: float(np.sqrt(c.grad_squared_sum(case.grads, scalar)))
    raise ValueError(impl)


@pytest.mark.parametrize(
    ("what", "impl"), [(what, impl) for what, impls in IMPLS.items() for impl in impls], ids=lambda v: v
)
def test_adamw(benchmark: Any, case: Case, what: str, impl: str) -> None:
    assert GradSquaredSum().backend == "cpu_kernel", explain()  # otherwise the "kernel" rows would time the reference
    numel = sum(w.size for w in case.weights)
    benchmark.group = f"AdamW {what}, 21.2M Thinker ({len(case.weights)} tensors, {numel / 1e6:.1f}M values) fp32"
    if what == "update":
        fn, weights = update_callable(impl, case)
        fn()  # first step, from the common start (compiles the jit rows)
        check_close(weights(), case.want_weights, impl, rtol=1e-5)
        traffic = 28 * numel
    else:
        fn = norm_callable(impl, case)
        got = fn()
        assert abs(got - case.want_norm) <= 1e-5 * case.want_norm, f"{impl}: norm {got} vs {case.want_norm}"
        traffic = 4 * numel
    noise = run_budgeted(benchmark, fn, max_rounds=20)
    benchmark.extra_info.update(
        section="Optimizer step (memory-bound: GB/s)",
        impl=impl,
        compare={
            **({"vs its reference": MS_REFERENCE_JIT} if impl in (MS_KERNEL_JIT, MS_KERNEL) else {}),
            **({"vs its reference": SANDBOX_SCALAR} if impl == SANDBOX_FAST else {}),
            **({"vs torch (peer)": PEER[what]} if impl != PEER[what] else {}),
        },
        headline=impl in HEADLINE,
        bytes=traffic,
        details=noise,
        note=NOTE,
    )
