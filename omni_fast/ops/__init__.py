"""One Python face per hot op: validates inputs, then dispatches to a compiled kernel or the reference."""

from omni_fast.ops.activation import Gelu, SwiGLU, gelu, swiglu
from omni_fast.ops.adamw import GradSquaredSum, grad_squared_sum
from omni_fast.ops.attention import FlashAttention, flash_attention
from omni_fast.ops.layer_norm import LayerNormOp, layer_norm
from omni_fast.ops.reference import MASK_VALUE, attention_reference
from omni_fast.ops.rms_norm import RmsNorm, rms_norm
from omni_fast.ops.rope_index import get_rope_index
from omni_fast.ops.rotary import Rotary, apply_rotary
from omni_fast.ops.scatter import multimodal_scatter

__all__ = [
    "MASK_VALUE",
    "FlashAttention",
    "Gelu",
    "GradSquaredSum",
    "LayerNormOp",
    "RmsNorm",
    "Rotary",
    "SwiGLU",
    "apply_rotary",
    "attention_reference",
    "flash_attention",
    "gelu",
    "get_rope_index",
    "grad_squared_sum",
    "layer_norm",
    "multimodal_scatter",
    "rms_norm",
    "swiglu",
]
