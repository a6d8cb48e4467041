"""Plain MindSpore references for the hot ops.

These are the oracles the compiled kernels are tested against, and the path the dispatcher falls back to when
no kernel can serve an input. They use only ops that have CPU kernels in MindSpore 2.7.2 in both PyNative and
``ms.jit`` (no ``mint.transpose/chunk/split/repeat_interleave``, no ``mint`` embedding/gelu/layer_norm).
"""

from __future__ import annotations

import math

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


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """torch's LayerNorm over the last axis (biased variance), in float32, rounded once to ``x``'s dtype.

    What ``omni_fast.model.layers.LayerNorm`` computes when no kernel serves; the float32 casts are there because
    MindSpore has no bfloat16 CPU kernels (for float32 inputs they are no-ops).
    """
    x32 = x.astype(ms.float32)
    mean = ops.mean(x32, -1, keep_dims=True)
    centered = x32 - mean
    var = ops.mean(centered * centered, -1, keep_dims=True)
    y = centered * ops.rsqrt(var + eps)
    return (y * weight.astype(ms.float32) + bias.astype(ms.float32)).astype(x.dtype)


def rotate_half_reference(x: Tensor) -> Tensor:
    """cat(-x2, x1) over the last axis (the half-split rotary convention)."""
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


def apply_rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` in float32, rounded once to ``x``'s dtype (as transformers' rotary).

    x is [..., N, D]; cos and sin are [..., 1, D] (broadcast over the N heads) or [..., D] with x's leading axes.
    """
    if cos.ndim == x.ndim - 1:
        cos = cos.reshape(cos.shape[:-1] + (1, cos.shape[-1]))
        sin = sin.reshape(sin.shape[:-1] + (1, sin.shape[-1]))
    x32 = x.astype(ms.float32)
    return (x32 * cos.astype(ms.float32) + rotate_half_reference(x32) * sin.astype(ms.float32)).astype(x.dtype)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` with ``silu(x) = x * sigmoid(x)``: the gated MLP of ``omni_fast.model.layers``.

    In float32, silu rounded to the inputs' dtype before the product and the product rounded again, as torch's
    ``F.silu(gate) * up`` does in bfloat16 (two ops); for float32 inputs the casts are no-ops. MindSpore has no
    bfloat16 CPU kernels, hence the casts.
    """
    g = gate.astype(ms.float32)
    silu = (g * ops.sigmoid(g)).astype(gate.dtype).astype(ms.float32)
    return (silu * up.astype(ms.float32)).astype(gate.dtype)


def gelu_reference(x: Tensor) -> Tensor:
    """Exact (erf) GELU, ``torch.nn.functional.gelu``'s default: ``0.5 x (1 + erf(x / sqrt 2))``.

    In float32, rounded once to ``x``'s dtype (torch's bfloat16 ``F.gelu``); for float32 inputs the casts are no-ops.
    """
    x32 = x.astype(ms.float32)
    return (0.5 * x32 * (1.0 + ops.erf(x32 * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


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


def _to_bnsd(x: Tensor, layout: str, heads: int | None) -> Tensor:
    """A flash-attention layout -> [B, N, S, D] (TND becomes one batch of T tokens)."""
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)
    t, n, d = x.shape  # TND
    return x.transpose(1, 0, 2).reshape(1, n, t, d)


def _from_bnsd(x: Tensor, layout: str) -> Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
    return x.reshape(n, s, d).transpose(1, 0, 2)  # TND


def _segment_positions(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cumulative ends [n] -> per token: its segment, its position inside it, and its segment's length."""
    ends = cu_seqlens.astype(ms.int32)
    tokens = ops.arange(total, dtype=ms.int32)
    segment = (ends.reshape(1, -1) <= tokens.reshape(-1, 1)).astype(ms.int32).sum(1)
    starts = ops.cat((ops.zeros((1,), ms.int32), ends[:-1]))
    lengths = ends - starts
    return segment, tokens - ops.gather(starts, segment, 0), ops.gather(lengths, segment, 0)


def _band(i: Tensor, j: Tensor, q_len, kv_len, sparse_mode: int, pre_tokens: int, next_tokens: int) -> Tensor:
    """Allowed (query i, key j) pairs of one segment: causal top-left (2), bottom-right (3) or the band (0)."""
    diff = j - i
    if sparse_mode == 2:
        return diff <= 0
    if sparse_mode == 3:
        return diff <= kv_len - q_len
    return ops.logical_and(diff >= -pre_tokens, diff <= next_tokens)


def flash_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    head_num: int,
    input_layout: str,
    actual_seq_qlen: Tensor | None,
    actual_seq_kvlen: Tensor | None,
    attn_mask: Tensor | None,
    scale: float,
    sparse_mode: int,
    pre_tokens: int,
    next_tokens: int,
) -> Tensor:
    """``mindspore.ops.flash_attention_score``'s meaning, composed: dense scores and one boolean mask.

    Inputs are already validated by ``omni_fast.ops.attention``. Rows that may see no key give 0 (the fused
    kernel's convention), unlike ``attention_reference`` alone, which averages all values there.
    """
    d = query.shape[-1] if input_layout != "BSH" else query.shape[-1] // head_num
    q = _to_bnsd(query, input_layout, head_num)
    k = _to_bnsd(key, input_layout, None if input_layout != "BSH" else key.shape[-1] // d)
    v = _to_bnsd(value, input_layout, None if input_layout != "BSH" else value.shape[-1] // d)
    sq, skv = q.shape[2], k.shape[2]
    if input_layout == "TND":
        seg_q, i, len_q = _segment_positions(actual_seq_qlen, sq)
        seg_kv, j, len_kv = _segment_positions(actual_seq_kvlen, skv)
        same = seg_q.reshape(-1, 1) == seg_kv.reshape(1, -1)
        band = _band(
            i.reshape(-1, 1),
            j.reshape(1, -1),
            len_q.reshape(-1, 1),
            len_kv.reshape(1, -1),
            sparse_mode,
            pre_tokens,
            next_tokens,
        )
        allowed = ops.logical_and(same, band).reshape(1, 1, sq, skv)
    else:
        pos_q = ops.arange(sq, dtype=ms.int32).reshape(-1, 1)
        pos_kv = ops.arange(skv, dtype=ms.int32).reshape(1, -1)
        allowed = _band(pos_q, pos_kv, sq, skv, sparse_mode, pre_tokens, next_tokens).reshape(1, 1, sq, skv)
        if attn_mask is not None:
            keep = ops.logical_not(attn_mask.astype(ms.bool_))
            allowed = ops.logical_and(allowed, keep.reshape((1, 1, sq, skv) if keep.ndim == 2 else keep.shape))
    bias = ops.where(allowed, 0.0, MASK_VALUE).astype(ms.float32)
    out = attention_reference(q, k, v, bias, scale)
    any_key = allowed.astype(out.dtype).max(-1, keepdims=True)  # 0 on rows that see no key
    return _from_bnsd(out * any_key, input_layout)


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


def grad_squared_sum_reference(grads: tuple) -> Tensor:
    """The composition: per-tensor float32 sums of squares, added up in float32."""
    total = ops.zeros((), ms.float32)
    for g in grads:
        g32 = g.astype(ms.float32)
        total = total + (g32 * g32).sum()
    return total
