"""One Python face per hot op: validates inputs, then dispatches to a compiled kernel or the reference."""

from omni_fast.ops.reference import MASK_VALUE, attention_reference, causal_padding_mask_bias, segment_mask_bias
from omni_fast.ops.rms_norm import RmsNorm, rms_norm

__all__ = ["MASK_VALUE", "RmsNorm", "attention_reference", "causal_padding_mask_bias", "rms_norm", "segment_mask_bias"]
