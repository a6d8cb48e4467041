"""Fused rotary position embedding (half-split): the face, its backends and the MindSpore custom op with its backward.

``y = x * cos + rotate_half(x) * sin`` with x [..., N, D] and cos, sin [..., 1, D] or [..., D] sharing x's leading
axes: [B, S, N, D] with [B, S, 1, D] in the text model, [T, N, D] with [T, 1, D] in the vision tower.

Backends: ``ascend`` is the composition (``apply_rotary_reference``), not MindSpore's fused
``ops.rotary_position_embedding``: that one takes 4-D layouts only (with B, N < 1000 and D < 896), so not the vision
tower's [T, N, D]; nothing here has run on an NPU. ``cpu_kernel`` is our C++ kernel (``kernels/rotary.h``) through
``ops.Custom`` with a bprop calling the backward kernel; ``reference`` the composition.
"""

from __future__ import annotations

import functools

import mindspore as ms
from mindspore import Tensor, nn, ops

from omni_fast.ops import dispatch
from omni_fast.ops.library import aot_op
from omni_fast.ops.reference import apply_rotary_reference


def backend_reasons(dtype: ms.dtype) -> dict:
    """Why each backend cannot serve the rotary embedding on inputs of ``dtype`` (empty list = it can)."""
    return dispatch.kernel_backend_reasons(dtype)


@functools.cache
def _kernel_ops() -> ops.Custom:
    backward = aot_op("RotaryBackward", lambda dy, cos, sin: dy)

    def bprop(x, cos, sin, out, dout):
        # cos and sin are functions of the positions only: no gradient flows into them. The zeros are made in float32
        # and cast because MindSpore has no bfloat16 ZerosLike on CPU.
        zeros = ops.zeros(cos.shape, ms.float32).astype(cos.dtype)
        return backward(dout, cos, sin), zeros, zeros

    return aot_op("RotaryForward", lambda x, cos, sin: x, bprop)


class Rotary(nn.Cell):
    """``x * cos + rotate_half(x) * sin``; the backend is chosen once, for inputs of ``dtype``."""

    def __init__(self, dtype: ms.dtype = ms.float32):
        super().__init__()
        self.backend = dispatch.choose("rotary", backend_reasons(dtype))
        self.kernel = _kernel_ops() if self.backend == "cpu_kernel" else None

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.backend == "cpu_kernel":
            return self.kernel(x, cos, sin)
        return apply_rotary_reference(x, cos, sin)


def check_inputs(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    if x.ndim < 2 or x.shape[-1] % 2 != 0:
        raise ValueError(f"rotary: x must be [..., heads, head_dim] with an even head_dim, got shape {x.shape}")
    lead, d = tuple(x.shape[:-2]), x.shape[-1]
    allowed = (lead + (1, d), lead + (d,))
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape not in allowed:
            want = f"{allowed[0]} or {allowed[1]}"
            raise ValueError(f"rotary: {name} has shape {t.shape}, expected {want} (x is {x.shape})")
        if t.dtype != x.dtype:
            raise ValueError(f"rotary: {name} dtype {t.dtype} differs from x dtype {x.dtype}")


@functools.cache
def _cached(dtype: ms.dtype) -> Rotary:
    return Rotary(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` (rotate_half(x) = cat(-x2, x1), float32 arithmetic); differentiable in x."""
    check_inputs(x, cos, sin)
    return _cached(x.dtype)(x, cos, sin)


def explain(dtype: ms.dtype = ms.float32) -> str:
    """Which backend would serve the rotary embedding for ``dtype`` here, and why the others would not."""
    return dispatch.explain(backend_reasons(dtype))
