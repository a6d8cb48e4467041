"""One Python face per hot op: validates inputs, then dispatches to a compiled kernel or the reference."""

from omni_fast.ops.attention import FlashAttention, flash_attention
from omni_fast.ops.reference import MASK_VALUE, attention_reference
from omni_fast.ops.rms_norm import RmsNorm, rms_norm
from omni_fast.ops.rope_index import get_rope_index
from omni_fast.ops.scatter import multimodal_scatter

__all__ = [
    "MASK_VALUE",
    "FlashAttention",
    "RmsNorm",
    "attention_reference",
    "flash_attention",
    "get_rope_index",
    "multimodal_scatter",
    "rms_norm",
]
