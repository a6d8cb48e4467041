"""Fused LayerNorm: the face, its backends and the MindSpore custom op with its backward.

Backends: ``ascend`` is MindSpore's own fused ``mint.nn.functional.layer_norm`` (it has no CPU kernel in PyNative;
written from its documentation and never run on an NPU here), ``cpu_kernel`` our C++ kernel (``kernels/layer_norm.h``)
through ``ops.Custom`` with a bprop calling the backward kernel, ``reference`` the composition of plain MindSpore ops
(``layer_norm_reference``, what ``omni_fast.model.layers.LayerNorm`` computes).
"""

from __future__ import annotations

import functools

import mindspore as ms
import numpy as np
from mindspore import Tensor, mint, nn, ops

from omni_fast.ops import dispatch
from omni_fast.ops.library import aot_op
from omni_fast.ops.reference import layer_norm_reference


def backend_reasons(dtype: ms.dtype) -> dict:
    """Why each backend cannot serve LayerNorm on inputs of ``dtype`` (empty list = it can)."""
    return dispatch.kernel_backend_reasons(dtype)


@functools.cache
def _kernel_ops() -> ops.Custom:
    backward = aot_op("LayerNormBackward", lambda dy, x, w, eps: (x, w, w))

    def bprop(x, w, b, eps, out, dout):
        dx, dw, db = backward(dout, x, w, eps)
        return dx, dw, db, ops.zeros_like(eps)

    return aot_op("LayerNormForward", lambda x, w, b, eps: x, bprop)


class LayerNormOp(nn.Cell):
    """LayerNorm over the last axis with a fixed ``eps``; the backend is chosen once, for inputs of ``dtype``."""

    def __init__(self, eps: float, dtype: ms.dtype = ms.float32):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"layer_norm: eps must be positive, got {eps}")
        self.eps = float(eps)
        self.backend = dispatch.choose("layer_norm", backend_reasons(dtype))
        self.eps_tensor = Tensor(np.array([eps], dtype=np.float32))
        self.kernel = _kernel_ops() if self.backend == "cpu_kernel" else None

    def construct(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        if self.backend == "cpu_kernel":
            return self.kernel(x, weight, bias, self.eps_tensor)
        if self.backend == "ascend":
            return mint.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        return layer_norm_reference(x, weight, bias, self.eps)


def check_inputs(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    if x.ndim < 1:
        raise ValueError("layer_norm: x must have at least one axis")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (x.shape[-1],):
            raise ValueError(f"layer_norm: {name} has shape {t.shape}, expected ({x.shape[-1]},) (x's last axis)")
        if t.dtype != x.dtype:
            raise ValueError(f"layer_norm: {name} dtype {t.dtype} differs from x dtype {x.dtype}")


@functools.cache
def _cached(eps: float, dtype: ms.dtype) -> LayerNormOp:
    return LayerNormOp(eps, dtype)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis (biased variance, float32 statistics,
    torch's ``F.layer_norm``); differentiable."""
    check_inputs(x, weight, bias)
    return _cached(float(eps), x.dtype)(x, weight, bias)


def explain(dtype: ms.dtype = ms.float32) -> str:
    """Which backend would serve LayerNorm for ``dtype`` here, and why the others would not."""
    return dispatch.explain(backend_reasons(dtype))
