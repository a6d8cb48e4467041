"""RMSNorm forward and forward+backward at model shapes: our kernel vs its references vs torch, in one run.

Rows per case (a case = shape x direction, one pytest-benchmark group):

* MindSpore kernel: the ``RmsNorm`` op cell with the ``cpu_kernel`` backend (our aot custom op + its bprop),
  PyNative and under ``ms.jit``;
* MindSpore reference: ``rms_norm_reference`` (plain MindSpore ops, MindSpore autodiff), PyNative and jit;
* torch ``F.rms_norm`` (+ ``torch.autograd.grad``): the peer;
* the C++ sandbox on numpy (``omni_fast._C``): fast path vs scalar reference, without MindSpore in the way.

RMSNorm is memory-bound, so the derived metric is GB/s of compulsory traffic, not a fraction of the GEMM peak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mindspore as ms
import numpy as np
import pytest
import torch
from harness import (
    KERNEL_METHOD_NOTE,
    MS_KERNEL,
    MS_KERNEL_JIT,
    SANDBOX_FAST,
    SANDBOX_SCALAR,
    check_close,
    kernel_rows,
    ms_sync,
    run_budgeted,
)
from mindspore import Tensor, nn

from omni_fast.ops.library import host_module
from omni_fast.ops.reference import rms_norm_reference
from omni_fast.ops.rms_norm import RmsNorm, explain

EPS = 1e-6
SHAPES = {"text": (4096, 3584), "vision": (16384, 1280)}  # 7B thinker hidden x 4k tokens; ViT hidden x 16k patches
DIRECTIONS = ("fwd", "fwd+bwd")

MS_REFERENCE = "MindSpore reference (PyNative)"
MS_REFERENCE_JIT = "MindSpore reference (jit)"
TORCH = "torch F.rms_norm"
IMPLS, COMPARE, HEADLINE = kernel_rows(MS_REFERENCE, MS_REFERENCE_JIT, TORCH)

NOTE = KERNEL_METHOD_NOTE + (
    "RMSNorm gradients: dx, dw. Compulsory traffic: fwd reads x, w and writes y (2N + n floats); fwd+bwd adds "
    "reading dy, x, w and writing dx, dw (5N + 3n floats in all)."
)


class _Reference(nn.Cell):
    def construct(self, x: Tensor, w: Tensor) -> Tensor:
        return rms_norm_reference(x, w, EPS)


KERNEL = RmsNorm(EPS)
REFERENCE = _Reference()


# ms.jit needs module-level functions written out in a file; one per (implementation, direction).
@ms.jit
def _jit_kernel_fwd(x: Tensor, w: Tensor) -> Tensor:
    return KERNEL(x, w)


@ms.jit
def _jit_reference_fwd(x: Tensor, w: Tensor) -> Tensor:
    return REFERENCE(x, w)


def _kernel_fwd_bwd(x: Tensor, w: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    y, pullback = ms.vjp(KERNEL, x, w)
    dx, dw = pullback(dy)
    return y, dx, dw


def _reference_fwd_bwd(x: Tensor, w: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    y, pullback = ms.vjp(REFERENCE, x, w)
    dx, dw = pullback(dy)
    return y, dx, dw


@ms.jit
def _jit_kernel_fwd_bwd(x: Tensor, w: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel_fwd_bwd(x, w, dy)


@ms.jit
def _jit_reference_fwd_bwd(x: Tensor, w: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _reference_fwd_bwd(x, w, dy)


@dataclass
class Inputs:
    x: np.ndarray
    w: np.ndarray
    dy: np.ndarray
    ms_args: tuple[Tensor, Tensor, Tensor]
    torch_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    torch_leaves: tuple[torch.Tensor, torch.Tensor]  # x, w with requires_grad, for the backward


@pytest.fixture(scope="module")
def inputs() -> Callable[[str], Inputs]:
    cache: dict[str, Inputs] = {}

    def get(shape_name: str) -> Inputs:
        if shape_name not in cache:
            cache.clear()  # one shape resident at a time: the arrays are 60-85 MB each
            rng = np.random.default_rng(0)
            shape = SHAPES[shape_name]
            x = rng.standard_normal(shape, dtype=np.float32)
            w = rng.standard_normal(shape[-1], dtype=np.float32)
            dy = rng.standard_normal(shape, dtype=np.float32)
            tx, tw, tdy = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(dy)
            leaves = (tx.clone().requires_grad_(True), tw.clone().requires_grad_(True))
            cache[shape_name] = Inputs(x, w, dy, (Tensor(x), Tensor(w), Tensor(dy)), (tx, tw, tdy), leaves)
        return cache[shape_name]

    return get


def _callable(impl: str, direction: str, d: Inputs) -> Callable[[], tuple[Any, ...]]:
    """The call to time; it returns (y,) or (y, dx, dw)."""
    fwd = direction == "fwd"
    x, w, dy = d.ms_args
    c = host_module()
    n = d.x.shape[-1]
    if impl == MS_KERNEL:
        return (lambda: (ms_sync(KERNEL(x, w)),)) if fwd else (lambda: ms_sync(_kernel_fwd_bwd(x, w, dy)))
    if impl == MS_REFERENCE:
        return (lambda: (ms_sync(REFERENCE(x, w)),)) if fwd else (lambda: ms_sync(_reference_fwd_bwd(x, w, dy)))
    if impl == MS_KERNEL_JIT:
        return (lambda: (ms_sync(_jit_kernel_fwd(x, w)),)) if fwd else (lambda: ms_sync(_jit_kernel_fwd_bwd(x, w, dy)))
    if impl == MS_REFERENCE_JIT:
        if fwd:
            return lambda: (ms_sync(_jit_reference_fwd(x, w)),)
        return lambda: ms_sync(_jit_reference_fwd_bwd(x, w, dy))
    if impl == TORCH:
        tx, tw, tdy = d.torch_args
        gx, gw = d.torch_leaves
        if fwd:
            return lambda: (torch.nn.functional.rms_norm(tx, (n,), tw, EPS),)

        def torch_fwd_bwd() -> tuple[torch.Tensor, ...]:
            y = torch.nn.functional.rms_norm(gx, (n,), gw, EPS)
            return (y, *torch.autograd.grad(y, (gx, gw), tdy))

        return torch_fwd_bwd
    if impl in (SANDBOX_FAST, SANDBOX_SCALAR):
        scalar = impl == SANDBOX_SCALAR
        if fwd:
            return lambda: (c.rms_norm_forward(d.x, d.w, EPS, scalar),)
        return lambda: (c.rms_norm_forward(d.x, d.w, EPS, scalar), *c.rms_norm_backward(d.dy, d.x, d.w, EPS, scalar))
    raise ValueError(impl)


def _traffic_bytes(shape: tuple[int, int], direction: str) -> int:
    elements, cols = shape[0] * shape[1], shape[1]
    floats = 2 * elements + cols if direction == "fwd" else 5 * elements + 3 * cols
    return 4 * floats


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_rms_norm(benchmark: Any, inputs: Callable[[str], Inputs], shape_name: str, direction: str, impl: str) -> None:
    assert KERNEL.backend == "cpu_kernel", explain()  # otherwise the "kernel" rows would time the reference
    d = inputs(shape_name)
    shape = SHAPES[shape_name]
    benchmark.group = f"RMSNorm {direction}, {shape_name} {list(shape)} fp32"
    fn = _callable(impl, direction, d)

    want = _callable(SANDBOX_FAST, direction, d)()
    check_close(fn(), want, impl)  # first call: compiles the jit rows
    noise = run_budgeted(benchmark, fn)
    # GB/s and the ratios are derived from the minima when the JSON is written (conftest -> report.add_derived).
    benchmark.extra_info.update(
        section="RMSNorm (memory-bound: GB/s, not a fraction of the GEMM peak)",
        impl=impl,
        compare=COMPARE.get(impl, {}),
        headline=impl in HEADLINE,
        bytes=_traffic_bytes(shape, direction),
        details=noise,
        note=NOTE,
    )
