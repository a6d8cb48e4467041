"""Fused activations, SwiGLU (``silu(gate) * up``) and exact GELU: the faces, their backends and the MindSpore
custom ops with their backward.

On CPU, with float32 or bfloat16 inputs, each direction is one C++ pass (``kernels/swiglu.h``, ``kernels/gelu.h``)
instead of MindSpore's chain of elementwise kernels (Sigmoid, Mul, SigmoidGrad, AddN...; Erf alone is a slow scalar
kernel there). Elsewhere the composition in ``omni_fast.ops.reference`` runs: on Ascend through MindSpore's own
kernels (the ``ascend`` backend is that composition, not a dedicated fused op), and as the ``reference`` backend.
"""

from __future__ import annotations

import functools

import mindspore as ms
from mindspore import Tensor, nn, ops

from omni_fast.ops import dispatch
from omni_fast.ops.library import aot_op
from omni_fast.ops.reference import gelu_reference, swiglu_reference

DTYPES = (ms.float32, ms.bfloat16, ms.float16)  # what the faces accept; float16 runs the composition


def backend_reasons(dtype: ms.dtype) -> dict:
    """Why each backend cannot serve SwiGLU or GELU on inputs of ``dtype`` (empty list = it can)."""
    return dispatch.kernel_backend_reasons(dtype)


@functools.cache
def _swiglu_op() -> ops.Custom:
    backward = aot_op("SwiGluBackward", lambda dout, gate, up: (gate, up))

    def bprop(gate, up, out, dout):
        return backward(dout, gate, up)

    return aot_op("SwiGluForward", lambda gate, up: gate, bprop)


@functools.cache
def _gelu_op() -> ops.Custom:
    backward = aot_op("GeluBackward", lambda dout, x: x)

    def bprop(x, out, dout):
        return (backward(dout, x),)

    return aot_op("GeluForward", lambda x: x, bprop)


class SwiGLU(nn.Cell):
    """``silu(gate) * up`` elementwise; the backend is chosen once, for inputs of ``dtype``."""

    def __init__(self, dtype: ms.dtype = ms.float32):
        super().__init__()
        self.backend = dispatch.choose("swiglu", backend_reasons(dtype))
        self.kernel = _swiglu_op() if self.backend == "cpu_kernel" else None

    def construct(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.backend == "cpu_kernel":
            return self.kernel(gate, up)
        return swiglu_reference(gate, up)  # ascend and reference alike


class Gelu(nn.Cell):
    """Exact (erf) GELU elementwise; the backend is chosen once, for inputs of ``dtype``."""

    def __init__(self, dtype: ms.dtype = ms.float32):
        super().__init__()
        self.backend = dispatch.choose("gelu", backend_reasons(dtype))
        self.kernel = _gelu_op() if self.backend == "cpu_kernel" else None

    def construct(self, x: Tensor) -> Tensor:
        if self.backend == "cpu_kernel":
            return self.kernel(x)
        return gelu_reference(x)  # ascend and reference alike


def check_dtype(op: str, name: str, x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise ValueError(f"{op}: {name} has dtype {x.dtype}, expected float32, bfloat16 or float16")


def check_swiglu_inputs(gate: Tensor, up: Tensor) -> None:
    check_dtype("swiglu", "gate", gate)
    if up.shape != gate.shape:
        raise ValueError(f"swiglu: up has shape {up.shape}, expected gate's shape {gate.shape}")
    if up.dtype != gate.dtype:
        raise ValueError(f"swiglu: up dtype {up.dtype} differs from gate dtype {gate.dtype}")


@functools.cache
def _cached_swiglu(dtype: ms.dtype) -> SwiGLU:
    return SwiGLU(dtype)


@functools.cache
def _cached_gelu(dtype: ms.dtype) -> Gelu:
    return Gelu(dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (``silu(x) = x * sigmoid(x)``) for two tensors of one shape and dtype; differentiable."""
    check_swiglu_inputs(gate, up)
    return _cached_swiglu(gate.dtype)(gate, up)


def gelu(x: Tensor) -> Tensor:
    """Exact GELU ``0.5 x (1 + erf(x / sqrt 2))``, as ``torch.nn.functional.gelu`` by default; differentiable."""
    check_dtype("gelu", "x", x)
    return _cached_gelu(x.dtype)(x)


def explain(dtype: ms.dtype = ms.float32) -> str:
    """Which backend would serve SwiGLU and GELU for ``dtype`` here, and why the others would not."""
    return dispatch.explain(backend_reasons(dtype))
