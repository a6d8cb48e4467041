"""Fused RMSNorm: the face, its backends and the MindSpore custom op with its backward."""

from __future__ import annotations

import functools

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from omni_fast.ops import dispatch
from omni_fast.ops.library import aot_op
from omni_fast.ops.reference import rms_norm_reference


def backend_reasons(dtype: ms.dtype) -> dict:
    """Why each backend cannot serve RMSNorm on inputs of ``dtype`` (empty list = it can)."""
    return dispatch.kernel_backend_reasons(dtype)


@functools.cache
def _kernel_ops() -> ops.Custom:
    backward = aot_op("RmsNormBackward", lambda dy, x, w, eps: (x, w))

    def bprop(x, w, eps, out, dout):
        dx, dw = backward(dout, x, w, eps)
        return dx, dw, ops.zeros_like(eps)

    return aot_op("RmsNormForward", lambda x, w, eps: x, bprop)


class RmsNorm(nn.Cell):
    """RMSNorm over the last axis with a fixed ``eps``; the backend is chosen once, for inputs of ``dtype``."""

    def __init__(self, eps: float, dtype: ms.dtype = ms.float32):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"rms_norm: eps must be positive, got {eps}")
        self.eps = float(eps)
        self.backend = dispatch.choose("rms_norm", backend_reasons(dtype))
        self.eps_tensor = Tensor(np.array([eps], dtype=np.float32))
        self.kernel = _kernel_ops() if self.backend == "cpu_kernel" else None

    def construct(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.backend == "cpu_kernel":
            return self.kernel(x, weight, self.eps_tensor)
        if self.backend == "ascend":
            return ops.rms_norm(x, weight, self.eps)[0]
        return rms_norm_reference(x, weight, self.eps)


def check_inputs(x: Tensor, weight: Tensor) -> None:
    if x.ndim < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight has shape {weight.shape}, expected ({x.shape[-1]},) (x's last axis)")
    if weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight dtype {weight.dtype} differs from x dtype {x.dtype}")


@functools.cache
def _cached(eps: float, dtype: ms.dtype) -> RmsNorm:
    return RmsNorm(eps, dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` with float32 statistics; differentiable."""
    check_inputs(x, weight)
    return _cached(float(eps), x.dtype)(x, weight)


def explain(dtype: ms.dtype = ms.float32) -> str:
    """Which backend would serve RMSNorm for ``dtype`` here, and why the others would not."""
    return dispatch.explain(backend_reasons(dtype))
