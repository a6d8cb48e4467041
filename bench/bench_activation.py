"""SwiGLU and GELU forward and forward+backward at model shapes: our kernels vs the MindSpore compositions vs torch.

Cases (a case = op x shape x direction, one pytest-benchmark group):

* SwiGLU ``silu(gate) * up``: text MLP [1024, 1536] (1k tokens of the 21M test Thinker's intermediate size), vision
  MLP [8192, 1280] (8k patches);
* GELU: audio [4000, 1024] (4k frames), and the same [8192, 1280] vision-sized tensor.

The vision cases stop at 8k patches to keep the process under 2 GB: MindSpore keeps each jit graph's buffers and its
memory pool's high-water mark for the life of the process (16k patches peaked at 3.7 GB).

Rows per case:

* MindSpore kernel: the ``SwiGLU`` / ``Gelu`` op cell with the ``cpu_kernel`` backend (our aot custom op + its
  bprop), PyNative and under ``ms.jit``;
* MindSpore composition: ``swiglu_reference`` / ``gelu_reference`` (what the model runs today: Sigmoid/Erf, Mul...,
  MindSpore autodiff), PyNative and jit;
* torch ``F.silu(gate) * up`` / ``F.gelu`` (+ ``torch.autograd.grad``): the peer;
* the C++ sandbox on numpy (``omni_fast._C``): fast path vs scalar reference, without MindSpore in the way.

Elementwise ops are memory-bound, so the derived metric is GB/s of compulsory traffic.
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

from omni_fast.ops.activation import Gelu, SwiGLU, explain
from omni_fast.ops.library import host_module
from omni_fast.ops.reference import gelu_reference, swiglu_reference

CASES = {  # op -> shape name -> shape
    "swiglu": {"text": (1024, 1536), "vision": (8192, 1280)},
    "gelu": {"audio": (4000, 1024), "vision": (8192, 1280)},
}
DIRECTIONS = ("fwd", "fwd+bwd")

MS_REFERENCE = "MindSpore composition (PyNative)"
MS_REFERENCE_JIT = "MindSpore composition (jit)"
TORCH = "torch"
IMPLS, COMPARE, HEADLINE = kernel_rows(MS_REFERENCE, MS_REFERENCE_JIT, TORCH)

NOTE = KERNEL_METHOD_NOTE + (
    "torch is `F.silu(gate) * up` and `F.gelu(x)` (exact erf); the sandbox's scalar reference does double math. "
    "Compulsory traffic in float32 elements (N per tensor): SwiGLU fwd reads gate, up and writes out (3N), fwd+bwd "
    "adds reading dout, gate, up and writing both gradients (8N in all); GELU fwd 2N, fwd+bwd 5N."
)


class _SwiGluReference(nn.Cell):
    def construct(self, gate: Tensor, up: Tensor) -> Tensor:
        return swiglu_reference(gate, up)


class _GeluReference(nn.Cell):
    def construct(self, x: Tensor) -> Tensor:
        return gelu_reference(x)


CELLS = {
    ("swiglu", "kernel"): SwiGLU(),
    ("swiglu", "reference"): _SwiGluReference(),
    ("gelu", "kernel"): Gelu(),
    ("gelu", "reference"): _GeluReference(),
}


def _fwd_bwd(cell: nn.Cell, dy: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    y, pullback = ms.vjp(cell, *inputs)
    grads = pullback(dy)
    return (y, *grads) if isinstance(grads, tuple) else (y, grads)


# ms.jit needs module-level functions written out in a file; one per (op, implementation, direction).
@ms.jit
def _jit_swiglu_kernel_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return CELLS["swiglu", "kernel"](gate, up)


@ms.jit
def _jit_swiglu_reference_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return CELLS["swiglu", "reference"](gate, up)


@ms.jit
def _jit_swiglu_kernel_fwd_bwd(gate: Tensor, up: Tensor, dy: Tensor) -> tuple[Tensor, ...]:
    return _fwd_bwd(CELLS["swiglu", "kernel"], dy, gate, up)


@ms.jit
def _jit_swiglu_reference_fwd_bwd(gate: Tensor, up: Tensor, dy: Tensor) -> tuple[Tensor, ...]:
    return _fwd_bwd(CELLS["swiglu", "reference"], dy, gate, up)


@ms.jit
def _jit_gelu_kernel_fwd(x: Tensor) -> Tensor:
    return CELLS["gelu", "kernel"](x)


@ms.jit
def _jit_gelu_reference_fwd(x: Tensor) -> Tensor:
    return CELLS["gelu", "reference"](x)


@ms.jit
def _jit_gelu_kernel_fwd_bwd(x: Tensor, dy: Tensor) -> tuple[Tensor, ...]:
    return _fwd_bwd(CELLS["gelu", "kernel"], dy, x)


@ms.jit
def _jit_gelu_reference_fwd_bwd(x: Tensor, dy: Tensor) -> tuple[Tensor, ...]:
    return _fwd_bwd(CELLS["gelu", "reference"], dy, x)


JIT = {
    ("swiglu", "kernel", "fwd"): _jit_swiglu_kernel_fwd,
    ("swiglu", "reference", "fwd"): _jit_swiglu_reference_fwd,
    ("swiglu", "kernel", "fwd+bwd"): _jit_swiglu_kernel_fwd_bwd,
    ("swiglu", "reference", "fwd+bwd"): _jit_swiglu_reference_fwd_bwd,
    ("gelu", "kernel", "fwd"): _jit_gelu_kernel_fwd,
    ("gelu", "reference", "fwd"): _jit_gelu_reference_fwd,
    ("gelu", "kernel", "fwd+bwd"): _jit_gelu_kernel_fwd_bwd,
    ("gelu", "reference", "fwd+bwd"): _jit_gelu_reference_fwd_bwd,
}


@dataclass
class Inputs:
    arrays: tuple[np.ndarray, ...]  # the op's inputs (gate, up or x), then dy
    ms_args: tuple[Tensor, ...]
    torch_args: tuple[torch.Tensor, ...]
    torch_leaves: tuple[torch.Tensor, ...]  # the op's inputs with requires_grad, for the backward


@pytest.fixture(scope="module")
def inputs() -> Callable[[str, str], Inputs]:
    cache: dict[tuple[str, str], Inputs] = {}

    def get(op: str, shape_name: str) -> Inputs:
        if (op, shape_name) not in cache:
            cache.clear()  # one case resident at a time: the arrays are up to 42 MB each
            rng = np.random.default_rng(0)
            shape = CASES[op][shape_name]
            arrays = tuple(rng.standard_normal(shape, dtype=np.float32) * 2 for _ in range(3 if op == "swiglu" else 2))
            # Every framework's tensors share the numpy buffers (no op writes its inputs): one copy of each input.
            tensors = tuple(torch.from_numpy(a) for a in arrays)
            leaves = tuple(torch.from_numpy(a).requires_grad_(True) for a in arrays[:-1])
            cache[op, shape_name] = Inputs(arrays, tuple(ms.from_numpy(a) for a in arrays), tensors, leaves)
        return cache[op, shape_name]

    return get


def _torch_op(op: str) -> Callable[..., torch.Tensor]:
    if op == "swiglu":
        return lambda gate, up: torch.nn.functional.silu(gate) * up
    return torch.nn.functional.gelu


def _sandbox(op: str, direction: str, d: Inputs, scalar: bool) -> Callable[[], tuple[Any, ...]]:
    c = host_module()
    *xs, dy = d.arrays
    forward, backward = getattr(c, f"{op}_forward"), getattr(c, f"{op}_backward")
    if direction == "fwd":
        return lambda: (forward(*xs, scalar),)

    def fwd_bwd() -> tuple[Any, ...]:
        grads = backward(dy, *xs, scalar)
        return (forward(*xs, scalar), *(grads if isinstance(grads, tuple) else (grads,)))

    return fwd_bwd


def _callable(op: str, impl: str, direction: str, d: Inputs) -> Callable[[], tuple[Any, ...]]:
    """The call to time; it returns (y,) or (y, *input gradients)."""
    fwd = direction == "fwd"
    *xs, dy = d.ms_args
    if impl in (MS_KERNEL, MS_REFERENCE):
        cell = CELLS[op, "kernel" if impl == MS_KERNEL else "reference"]
        return (lambda: (ms_sync(cell(*xs)),)) if fwd else (lambda: ms_sync(_fwd_bwd(cell, dy, *xs)))
    if impl in (MS_KERNEL_JIT, MS_REFERENCE_JIT):
        jitted = JIT[op, "kernel" if impl == MS_KERNEL_JIT else "reference", direction]
        return (lambda: (ms_sync(jitted(*xs)),)) if fwd else (lambda: ms_sync(jitted(*xs, dy)))
    if impl == TORCH:
        fn = _torch_op(op)
        *txs, tdy = d.torch_args
        if fwd:
            return lambda: (fn(*txs),)

        def torch_fwd_bwd() -> tuple[torch.Tensor, ...]:
            y = fn(*d.torch_leaves)
            return (y, *torch.autograd.grad(y, d.torch_leaves, tdy))

        return torch_fwd_bwd
    if impl in (SANDBOX_FAST, SANDBOX_SCALAR):
        return _sandbox(op, direction, d, impl == SANDBOX_SCALAR)
    raise ValueError(impl)


def _traffic_bytes(op: str, shape: tuple[int, int], direction: str) -> int:
    elements = shape[0] * shape[1]
    per_element = {("swiglu", "fwd"): 3, ("swiglu", "fwd+bwd"): 8, ("gelu", "fwd"): 2, ("gelu", "fwd+bwd"): 5}
    return 4 * elements * per_element[op, direction]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("op, shape_name", [(op, name) for op in CASES for name in CASES[op]])
def test_activation(
    benchmark: Any, inputs: Callable[[str, str], Inputs], op: str, shape_name: str, direction: str, impl: str
) -> None:
    assert CELLS[op, "kernel"].backend == "cpu_kernel", explain()  # else the "kernel" rows would time the reference
    d = inputs(op, shape_name)
    shape = CASES[op][shape_name]
    benchmark.group = f"{'SwiGLU' if op == 'swiglu' else 'GELU'} {direction}, {shape_name} {list(shape)} fp32"
    fn = _callable(op, impl, direction, d)

    want = _callable(op, SANDBOX_FAST, direction, d)()
    check_close(fn(), want, impl)  # first call: compiles the jit rows
    del want  # up to three 42 MB arrays that the timed rounds do not need
    noise = run_budgeted(benchmark, fn)
    # GB/s and the ratios are derived from the minima when the JSON is written (conftest -> report.add_derived).
    benchmark.extra_info.update(
        section="Activations: SwiGLU and GELU (memory-bound: GB/s, not a fraction of the GEMM peak)",
        impl=impl,
        compare=COMPARE.get(impl, {}),
        headline=impl in HEADLINE,
        bytes=_traffic_bytes(op, shape, direction),
        details=noise,
        note=NOTE,
    )
