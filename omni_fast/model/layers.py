"""Building blocks shared by the three towers.

Parameters are stored in ``param_dtype`` (float32 or bfloat16) and used in ``compute_dtype``. On CPU MindSpore
has no bf16 kernels, so a bf16 model keeps bf16 storage and computes in float32 (see ``omni_fast.ops.device``).
Only ops with CPU kernels in both PyNative and ``ms.jit`` are used here.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from omni_fast.ops import dispatch
from omni_fast.ops.layer_norm import LayerNormOp
from omni_fast.ops.rms_norm import RmsNorm


def new_parameter(shape: tuple[int, ...], dtype: ms.dtype, fill: float = 0.0) -> Parameter:
    """A parameter filled with a constant; real values come from a checkpoint or ``init_weights``."""
    return Parameter(Tensor(np.full(shape, fill, dtype=np.float32)).astype(dtype))


class Linear(nn.Cell):
    """``y = x W^T + b`` with W of shape [out, in], the Hugging Face layout."""

    def __init__(self, in_features: int, out_features: int, bias: bool, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.weight = new_parameter((out_features, in_features), param_dtype)
        self.bias = new_parameter((out_features,), param_dtype) if bias else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features), self.weight.astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias.astype(self.compute_dtype)
        return y.reshape(*lead, self.out_features)


class Embedding(nn.Cell):
    """Row lookup by id (``mint`` embedding has no CPU kernel; ``ops.gather`` does, with a scatter-add backward).

    The CPU gather has no bf16 kernel, so with bf16 storage on CPU the table is cast before the lookup.
    """

    def __init__(self, num_embeddings: int, dim: int, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.weight = new_parameter((num_embeddings, dim), param_dtype)

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.weight.astype(self.compute_dtype), ids, 0)


class RMSNorm(nn.Cell):
    """RMSNorm with a learned scale; the fused op is picked for inputs of ``compute_dtype``."""

    def __init__(self, dim: int, eps: float, param_dtype: ms.dtype, compute_dtype: ms.dtype | None = None):
        super().__init__()
        self.compute_dtype = compute_dtype or dispatch.compute_dtype(param_dtype)
        self.weight = new_parameter((dim,), param_dtype, fill=1.0)
        self.norm = RmsNorm(eps, self.compute_dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.norm(x, self.weight.astype(x.dtype))


class LayerNorm(nn.Cell):
    """LayerNorm with affine weight and bias over the last axis; the fused op is picked for the compute dtype."""

    def __init__(self, dim: int, eps: float, param_dtype: ms.dtype, compute_dtype: ms.dtype | None = None):
        super().__init__()
        self.weight = new_parameter((dim,), param_dtype, fill=1.0)
        self.bias = new_parameter((dim,), param_dtype)
        self.norm = LayerNormOp(eps, compute_dtype or dispatch.compute_dtype(param_dtype))

    def construct(self, x: Tensor) -> Tensor:
        return self.norm(x, self.weight.astype(x.dtype), self.bias.astype(x.dtype))
