"""Plain MindSpore references for the hot ops.

These are the oracles the compiled kernels are tested against, and the path the dispatcher falls back to when
no kernel can serve an input. They use only ops that have CPU kernels in MindSpore 2.7.2 in both PyNative and
``ms.jit`` (no ``mint.transpose/chunk/split/repeat_interleave``, no ``mint`` embedding/gelu/layer_norm).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

# Added to masked attention scores. Finite, so that a fully masked row softmaxes to a uniform distribution
# (what transformers' eager attention produces) instead of NaN.
MASK_VALUE = -1.0e30


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last axis, statistics in float32."""
    x32 = x.astype(ms.float32)
    variance = ops.mean(x32 * x32, -1, keep_dims=True)
    y = (x32 * ops.rsqrt(variance + eps)).astype(x.dtype)
    return weight.astype(y.dtype) * y


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Nkv, S, D] -> [B, Nkv*n_rep, S, D], each key/value head repeated for its query group."""
    if n_rep == 1:
        return x
    b, n_kv, s, d = x.shape
    return ops.broadcast_to(x.reshape(b, n_kv, 1, s, d), (b, n_kv, n_rep, s, d)).reshape(b, n_kv * n_rep, s, d)


def attention_reference(query: Tensor, key: Tensor, value: Tensor, mask_bias: Tensor | None, scale: float) -> Tensor:
    """softmax(Q K^T * scale + mask_bias) V with float32 softmax; BNSD layout, GQA by head repetition.

    ``mask_bias`` broadcasts to [B, N, Sq, Skv]: 0 where attention is allowed, ``MASK_VALUE`` where not.
    """
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)
    value = repeat_kv(value, n_rep)
    scores = ops.matmul(query, ops.swapaxes(key, -1, -2)).astype(ms.float32) * scale
    if mask_bias is not None:
        scores = scores + mask_bias
    probs = ops.softmax(scores, -1).astype(value.dtype)
    return ops.matmul(probs, value)


def segment_mask_bias(segment_ids: Tensor) -> Tensor:
    """[T] segment ids -> [1, 1, T, T] additive bias allowing attention only inside a segment."""
    same = segment_ids.reshape(-1, 1) == segment_ids.reshape(1, -1)
    return ops.where(same, 0.0, MASK_VALUE).astype(ms.float32).reshape(1, 1, *same.shape)


def causal_padding_mask_bias(attention_mask: Tensor) -> Tensor:
    """[B, S] (1 = real token) -> [B, 1, S, S] additive bias: causal, and no attention to padding keys."""
    s = attention_mask.shape[1]
    pos = ops.arange(s, dtype=ms.int32)
    causal = pos.reshape(-1, 1) >= pos.reshape(1, -1)
    keys_valid = attention_mask.reshape(attention_mask.shape[0], 1, 1, s) > 0
    allowed = ops.logical_and(causal.reshape(1, 1, s, s), keys_valid)
    return ops.where(allowed, 0.0, MASK_VALUE).astype(ms.float32)


def multimodal_scatter_reference(
    inputs_embeds: Tensor, input_ids: Tensor, features: list[tuple[int, Tensor]]
) -> Tensor:
    """Replace the embedding rows at each placeholder id by that modality's features, in order.

    The composition peers use: one ``masked_scatter`` per modality. Counts must match exactly.
    """
    hidden = inputs_embeds.shape[-1]
    for token_id, feats in features:
        mask = (input_ids == token_id).reshape(*input_ids.shape, 1)
        mask = ops.broadcast_to(mask, inputs_embeds.shape)
        inputs_embeds = inputs_embeds.masked_scatter(mask, feats.astype(inputs_embeds.dtype).reshape(-1, hidden))
    return inputs_embeds
