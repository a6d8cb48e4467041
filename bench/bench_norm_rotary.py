"""LayerNorm and rotary embedding, forward and forward+backward at model shapes: our kernels vs the MindSpore
compositions they replace vs torch, in one run.

Cases (a case = op x shape x direction, one pytest-benchmark group):

* LayerNorm (audio encoder): [6000, 1280] (4 x 30 s of audio = 4 x 1500 frames, 7B d_model) and [4000, 256]
  (the 21M test model's d_model);
* rotary on q: [1, 1024, 8, 64] (21M model, 1k tokens) and [1, 4096, 28, 128] (7B thinker, 4k tokens), with
  cos/sin [1, S, 1, D] as ``TextModel.rotary`` builds them.

Rows per case:

* MindSpore kernel: the ``LayerNormOp`` / ``Rotary`` op cell with the ``cpu_kernel`` backend (our aot custom op +
  its bprop), PyNative and under ``ms.jit``;
* MindSpore composition: ``layer_norm_reference`` / ``apply_rotary_reference``, the plain-op compositions that
  ``omni_fast.model.layers`` uses today (MindSpore autodiff), PyNative and jit;
* torch: ``F.layer_norm``; transformers' rotary (``x * cos + rotate_half(x) * sin`` with Qwen2's
  ``rotate_half``), with ``torch.autograd.grad``: the peers;
* the C++ sandbox on numpy (``omni_fast._C``): fast path vs scalar reference, without MindSpore in the way.

Both ops are memory-bound, so the derived metric is GB/s of compulsory traffic.
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
from mindspore import Tensor, nn, ops
from transformers.models.qwen2.modeling_qwen2 import rotate_half

from omni_fast.ops.layer_norm import LayerNormOp
from omni_fast.ops.layer_norm import explain as explain_layer_norm
from omni_fast.ops.library import host_module
from omni_fast.ops.reference import apply_rotary_reference, layer_norm_reference
from omni_fast.ops.rotary import Rotary
from omni_fast.ops.rotary import explain as explain_rotary

EPS = 1e-5
LN_SHAPES = {"audio 7B": (6000, 1280), "audio 21M": (4000, 256)}
ROTARY_SHAPES = {"q 21M": (1, 1024, 8, 64), "q 7B": (1, 4096, 28, 128)}
DIRECTIONS = ("fwd", "fwd+bwd")

MS_REFERENCE = "MindSpore composition (PyNative)"
MS_REFERENCE_JIT = "MindSpore composition (jit)"
TORCH = "torch"
IMPLS, COMPARE, HEADLINE = kernel_rows(MS_REFERENCE, MS_REFERENCE_JIT, TORCH)

LN_NOTE = KERNEL_METHOD_NOTE + (
    "LayerNorm gradients: dx, dw, db. Compulsory traffic: fwd reads x, w, b and writes y (2N + 2n floats); "
    "fwd+bwd adds reading dy, x, w and writing dx, dw, db (5N + 5n floats in all)."
)
ROTARY_NOTE = KERNEL_METHOD_NOTE + (
    "Rotary gradient: dx only; cos and sin enter through `ops.stop_gradient` in MindSpore and without "
    "requires_grad in torch, as position tables do in the model. Compulsory traffic: fwd reads x, cos, sin and "
    "writes y (2N + 2T floats, T = rows x head_dim of the tables); fwd+bwd adds reading dy, cos, sin and writing "
    "dx (4N + 4T floats in all)."
)


class _LayerNormReference(nn.Cell):
    def construct(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return layer_norm_reference(x, w, b, EPS)


class _RotaryReference(nn.Cell):
    def construct(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rotary_reference(x, cos, sin)


LN_KERNEL = LayerNormOp(EPS)
LN_REFERENCE = _LayerNormReference()
ROTARY_KERNEL = Rotary()
ROTARY_REFERENCE = _RotaryReference()


# ms.jit needs module-level functions written out in a file; one per (op, implementation, direction).
@ms.jit
def _jit_ln_kernel_fwd(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return LN_KERNEL(x, w, b)


@ms.jit
def _jit_ln_reference_fwd(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return LN_REFERENCE(x, w, b)


def _ln_kernel_fwd_bwd(x: Tensor, w: Tensor, b: Tensor, dy: Tensor) -> tuple[Tensor, ...]:
    y, pullback = ms.vjp(LN_KERNEL, x, w, b)
    return (y, *pullback(dy))


def _ln_reference_fwd_bwd(x: Tensor, w: Tensor, b: Tensor, dy: Tensor) -> tuple[Tensor, ...]:
    y, pullback = ms.vjp(LN_REFERENCE, x, w, b)
    return (y, *pullback(dy))


@ms.jit
def _jit_ln_kernel_fwd_bwd(x: Tensor, w: Tensor, b: Tensor, dy: Tensor) -> tuple[Tensor, ...]:
    return _ln_kernel_fwd_bwd(x, w, b, dy)


@ms.jit
def _jit_ln_reference_fwd_bwd(x: Tensor, w: Tensor, b: Tensor, dy: Tensor) -> tuple[Tensor, ...]:
    return _ln_reference_fwd_bwd(x, w, b, dy)


@ms.jit
def _jit_rotary_kernel_fwd(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return ROTARY_KERNEL(x, cos, sin)


@ms.jit
def _jit_rotary_reference_fwd(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return ROTARY_REFERENCE(x, cos, sin)


def _rotary_kernel_x(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return ROTARY_KERNEL(x, ops.stop_gradient(cos), ops.stop_gradient(sin))


def _rotary_reference_x(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return ROTARY_REFERENCE(x, ops.stop_gradient(cos), ops.stop_gradient(sin))


def _rotary_kernel_fwd_bwd(x: Tensor, cos: Tensor, sin: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    y, pullback = ms.vjp(_rotary_kernel_x, x, cos, sin)
    return y, pullback(dy)[0]


def _rotary_reference_fwd_bwd(x: Tensor, cos: Tensor, sin: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    y, pullback = ms.vjp(_rotary_reference_x, x, cos, sin)
    return y, pullback(dy)[0]


@ms.jit
def _jit_rotary_kernel_fwd_bwd(x: Tensor, cos: Tensor, sin: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    return _rotary_kernel_fwd_bwd(x, cos, sin, dy)


@ms.jit
def _jit_rotary_reference_fwd_bwd(x: Tensor, cos: Tensor, sin: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    return _rotary_reference_fwd_bwd(x, cos, sin, dy)


def _torch_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


@dataclass
class Inputs:
    """One case's arrays: ``args`` are (x, w, b) for LayerNorm, (x, cos, sin) for rotary; dy has x's shape."""

    args: tuple[np.ndarray, ...]
    dy: np.ndarray
    ms_args: tuple[Tensor, ...]
    ms_dy: Tensor
    torch_args: tuple[torch.Tensor, ...]
    torch_dy: torch.Tensor
    torch_leaves: tuple[torch.Tensor, ...]  # the differentiated inputs with requires_grad (x, w, b / x)


@pytest.fixture(scope="module")
def inputs() -> Callable[[str, str], Inputs]:
    cache: dict[tuple[str, str], Inputs] = {}

    def get(op: str, shape_name: str) -> Inputs:
        if (op, shape_name) not in cache:
            cache.clear()  # one case resident at a time: the 7B rotary arrays are 59 MB each
            rng = np.random.default_rng(0)
            if op == "layer_norm":
                shape = LN_SHAPES[shape_name]
                args = (
                    rng.standard_normal(shape, dtype=np.float32),
                    rng.standard_normal(shape[-1], dtype=np.float32),
                    rng.standard_normal(shape[-1], dtype=np.float32),
                )
                grads = 3
            else:
                shape = ROTARY_SHAPES[shape_name]
                angles = rng.uniform(0, 100, (*shape[:2], 1, shape[-1])).astype(np.float32)
                args = (rng.standard_normal(shape, dtype=np.float32), np.cos(angles), np.sin(angles))
                grads = 1
            dy = rng.standard_normal(shape, dtype=np.float32)
            t_args = tuple(torch.from_numpy(a) for a in args)
            leaves = tuple(t.clone().requires_grad_(True) for t in t_args[:grads])
            cache[(op, shape_name)] = Inputs(
                args, dy, tuple(Tensor(a) for a in args), Tensor(dy), t_args, torch.from_numpy(dy), leaves
            )
        return cache[(op, shape_name)]

    return get


def _ln_callable(impl: str, direction: str, d: Inputs) -> Callable[[], tuple[Any, ...]]:
    """The LayerNorm call to time; it returns (y,) or (y, dx, dw, db)."""
    fwd = direction == "fwd"
    x, w, b = d.ms_args
    dy = d.ms_dy
    if impl == MS_KERNEL:
        return (lambda: (ms_sync(LN_KERNEL(x, w, b)),)) if fwd else (lambda: ms_sync(_ln_kernel_fwd_bwd(x, w, b, dy)))
    if impl == MS_REFERENCE:
        if fwd:
            return lambda: (ms_sync(LN_REFERENCE(x, w, b)),)
        return lambda: ms_sync(_ln_reference_fwd_bwd(x, w, b, dy))
    if impl == MS_KERNEL_JIT:
        if fwd:
            return lambda: (ms_sync(_jit_ln_kernel_fwd(x, w, b)),)
        return lambda: ms_sync(_jit_ln_kernel_fwd_bwd(x, w, b, dy))
    if impl == MS_REFERENCE_JIT:
        if fwd:
            return lambda: (ms_sync(_jit_ln_reference_fwd(x, w, b)),)
        return lambda: ms_sync(_jit_ln_reference_fwd_bwd(x, w, b, dy))
    if impl == TORCH:
        n = d.args[0].shape[-1]
        tx, tw, tb = d.torch_args
        if fwd:
            return lambda: (torch.nn.functional.layer_norm(tx, (n,), tw, tb, EPS),)

        def torch_fwd_bwd() -> tuple[torch.Tensor, ...]:
            gx, gw, gb = d.torch_leaves
            y = torch.nn.functional.layer_norm(gx, (n,), gw, gb, EPS)
            return (y, *torch.autograd.grad(y, (gx, gw, gb), d.torch_dy))

        return torch_fwd_bwd
    if impl in (SANDBOX_FAST, SANDBOX_SCALAR):
        c, scalar = host_module(), impl == SANDBOX_SCALAR
        xa, wa, ba = d.args
        if fwd:
            return lambda: (c.layer_norm_forward(xa, wa, ba, EPS, scalar),)
        return lambda: (
            c.layer_norm_forward(xa, wa, ba, EPS, scalar),
            *c.layer_norm_backward(d.dy, xa, wa, EPS, scalar),
        )
    raise ValueError(impl)


def _rotary_callable(impl: str, direction: str, d: Inputs) -> Callable[[], tuple[Any, ...]]:
    """The rotary call to time; it returns (y,) or (y, dx)."""
    fwd = direction == "fwd"
    x, cos, sin = d.ms_args
    dy = d.ms_dy
    if impl == MS_KERNEL:
        if fwd:
            return lambda: (ms_sync(ROTARY_KERNEL(x, cos, sin)),)
        return lambda: ms_sync(_rotary_kernel_fwd_bwd(x, cos, sin, dy))
    if impl == MS_REFERENCE:
        if fwd:
            return lambda: (ms_sync(ROTARY_REFERENCE(x, cos, sin)),)
        return lambda: ms_sync(_rotary_reference_fwd_bwd(x, cos, sin, dy))
    if impl == MS_KERNEL_JIT:
        if fwd:
            return lambda: (ms_sync(_jit_rotary_kernel_fwd(x, cos, sin)),)
        return lambda: ms_sync(_jit_rotary_kernel_fwd_bwd(x, cos, sin, dy))
    if impl == MS_REFERENCE_JIT:
        if fwd:
            return lambda: (ms_sync(_jit_rotary_reference_fwd(x, cos, sin)),)
        return lambda: ms_sync(_jit_rotary_reference_fwd_bwd(x, cos, sin, dy))
    if impl == TORCH:
        tx, tcos, tsin = d.torch_args
        if fwd:
            return lambda: (_torch_rotary(tx, tcos, tsin),)

        def torch_fwd_bwd() -> tuple[torch.Tensor, ...]:
            y = _torch_rotary(d.torch_leaves[0], tcos, tsin)
            return (y, *torch.autograd.grad(y, d.torch_leaves, d.torch_dy))

        return torch_fwd_bwd
    if impl in (SANDBOX_FAST, SANDBOX_SCALAR):
        c, scalar = host_module(), impl == SANDBOX_SCALAR
        xa, ca, sa = d.args
        if fwd:
            return lambda: (c.rotary_forward(xa, ca, sa, scalar),)
        return lambda: (c.rotary_forward(xa, ca, sa, scalar), c.rotary_backward(d.dy, ca, sa, scalar))
    raise ValueError(impl)


def _run(benchmark: Any, fn: Callable[[], tuple[Any, ...]], want: tuple[Any, ...], impl: str, **extra: Any) -> None:
    check_close(fn(), want, impl)  # first call: compiles the jit rows
    noise = run_budgeted(benchmark, fn)
    # GB/s and the ratios are derived from the minima when the JSON is written (conftest -> report.add_derived).
    benchmark.extra_info.update(
        impl=impl, compare=COMPARE.get(impl, {}), headline=impl in HEADLINE, details=noise, **extra
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape_name", list(LN_SHAPES))
def test_layer_norm(benchmark: Any, inputs: Callable[..., Inputs], shape_name: str, direction: str, impl: str) -> None:
    assert LN_KERNEL.backend == "cpu_kernel", explain_layer_norm()  # otherwise "kernel" rows would time the reference
    d = inputs("layer_norm", shape_name)
    rows, n = LN_SHAPES[shape_name]
    benchmark.group = f"LayerNorm {direction}, {shape_name} {[rows, n]} fp32"
    floats = 2 * rows * n + 2 * n if direction == "fwd" else 5 * rows * n + 5 * n
    want = _ln_callable(SANDBOX_FAST, direction, d)()
    _run(
        benchmark,
        _ln_callable(impl, direction, d),
        want,
        impl,
        section="LayerNorm (memory-bound: GB/s, not a fraction of the GEMM peak)",
        bytes=4 * floats,
        note=LN_NOTE,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape_name", list(ROTARY_SHAPES))
def test_rotary(benchmark: Any, inputs: Callable[..., Inputs], shape_name: str, direction: str, impl: str) -> None:
    assert ROTARY_KERNEL.backend == "cpu_kernel", explain_rotary()
    d = inputs("rotary", shape_name)
    shape = ROTARY_SHAPES[shape_name]
    benchmark.group = f"rotary {direction}, {shape_name} {list(shape)} fp32"
    elements, tables = int(np.prod(shape)), shape[0] * shape[1] * shape[3]
    floats = 2 * elements + 2 * tables if direction == "fwd" else 4 * elements + 4 * tables
    want = _rotary_callable(SANDBOX_FAST, direction, d)()
    _run(
        benchmark,
        _rotary_callable(impl, direction, d),
        want,
        impl,
        section="Rotary embedding (memory-bound: GB/s, not a fraction of the GEMM peak)",
        bytes=4 * floats,
        note=ROTARY_NOTE,
    )
