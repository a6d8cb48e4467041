"""Multi-tensor AdamW and gradient sum of squares: the backends, the MindSpore custom ops, the sum-of-squares face.

``omni_fast.train.optim.AdamW`` (the update's face) and ``global_grad_norm`` (the square root of
``grad_squared_sum``) dispatch here. ``cpu_kernel`` runs one C++ call for every tensor of the model
(kernels/adamw.h) where the ``reference`` composition launches several MindSpore kernels per tensor. ``ascend`` runs
that same reference composition: it is what serves on an NPU (no fused AdamW with torch's arithmetic is wired in
there).

The update op writes the weights, the Adam moments and the bfloat16 parameters beside fp32 masters IN PLACE: its
Parameter inputs are its outputs. ``side_effect_mem`` tells MindSpore so; under ``ms.jit`` that orders the write
before later reads of those Parameters (in PyNative the op runs when called, on the Parameters' own buffers).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from omni_fast.ops import dispatch
from omni_fast.ops.library import aot_entry
from omni_fast.ops.reference import grad_squared_sum_reference


def backend_reasons(dtypes: Sequence[ms.dtype]) -> dict:
    """Why each backend cannot serve AdamW (or the gradient norm) on tensors of ``dtypes`` (empty list = it can)."""
    return dispatch.kernel_backend_reasons(*dtypes)


def explain(dtypes: Sequence[ms.dtype] = (ms.float32,)) -> str:
    """Which backend would serve AdamW for parameters of ``dtypes`` here, and why the others would not."""
    return dispatch.explain(backend_reasons(dtypes))


def _scalar_output_op(entry: str) -> ops.Custom:
    """An aot op over any number of tensors whose one output is a float32 [1]."""
    return ops.Custom(
        aot_entry(entry), out_shape=lambda *shapes: [1], out_dtype=lambda *dtypes: ms.float32, func_type="aot"
    )


@functools.cache
def update_op() -> ops.Custom:
    """``AdamWUpdate(grads..., weights..., exp_avg..., exp_avg_sq..., low..., decay, hyper) -> [1]``, in place."""
    op = _scalar_output_op("AdamWUpdate")
    op.add_prim_attr("side_effect_mem", True)
    return op


@functools.cache
def squared_sum_op() -> ops.Custom:
    """``GradSquaredSum(grads...) -> [1]`` float32, accumulated in double."""
    return _scalar_output_op("GradSquaredSum")


def hyper_constants(beta1: float, beta2: float, eps: float) -> Tensor:
    """The step-independent tail of the update op's hyper tensor: [1 - beta1, beta2, 1 - beta2, eps] as float32.
    (1 - beta) is computed in double and rounded once, like the Python floats of the reference composition."""
    return Tensor(np.array([1.0 - beta1, beta2, 1.0 - beta2, eps], np.float32))


def hyper(lr_wd: Tensor, step_size: Tensor, bc2_sqrt: Tensor, grad_scale: Tensor, constants: Tensor) -> Tensor:
    """The update op's hyper tensor [8] from the step's scalar tensors (inside the graph: no host round trip)."""
    return ops.concat((ops.stack((lr_wd, step_size, bc2_sqrt, grad_scale)), constants))


class GradSquaredSum(nn.Cell):
    """Sum of the squared entries of a tuple of gradients; the backend is chosen once, for gradients of ``dtypes``."""

    def __init__(self, dtypes: Sequence[ms.dtype] = (ms.float32,)):
        super().__init__()
        self.backend = dispatch.choose("grad_squared_sum", backend_reasons(dtypes))
        self.kernel = squared_sum_op() if self.backend == "cpu_kernel" else None

    def construct(self, grads: tuple) -> Tensor:
        if self.backend == "cpu_kernel":
            return self.kernel(*grads).reshape(())
        return grad_squared_sum_reference(grads)


@functools.cache
def _cached(dtypes: tuple) -> GradSquaredSum:
    return GradSquaredSum(dtypes)


def grad_squared_sum(grads: tuple) -> Tensor:
    """Sum of the squared entries of every tensor in ``grads`` (float32 or bfloat16 on the kernel), a float32
    scalar: one fused call accumulating in double on CPU, the composition elsewhere; 0 for no tensors."""
    if not grads:
        return ops.zeros((), ms.float32)
    return _cached(tuple(g.dtype for g in grads))(grads)
