"""The Thinker's text decoder: Qwen2 (GQA, q/k/v bias, SwiGLU, RMSNorm) with multimodal 3-axis RoPE."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from omni_fast.config.model_config import TextConfig
from omni_fast.model.layers import Embedding, Linear, RMSNorm
from omni_fast.ops.activation import SwiGLU
from omni_fast.ops.attention import FlashAttention
from omni_fast.ops.rotary import Rotary


def mrope_axis_per_frequency(mrope_section: list[int], head_dim: int) -> np.ndarray:
    """Which position axis (0 t, 1 h, 2 w) drives each of the head_dim/2 rotary frequencies.

    transformers splits cat(freqs, freqs) into ``mrope_section * 2`` pieces and takes piece k from axis k % 3;
    both halves then use the same axis per frequency, so one index over head_dim/2 describes it.
    """
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(
            f"mrope_section {mrope_section} sums to {sum(mrope_section)}, expected head_dim/2 = {head_dim // 2}"
        )
    return np.concatenate([np.full(n, axis % 3, dtype=np.int32) for axis, n in enumerate(mrope_section)])


def padded_row_segments(attention_mask: Tensor) -> Tensor:
    """[B, S] (1 = real token, one contiguous run per row) -> int64 [3B] cumulative segment ends over B*S rows.

    Each row gives (padding before, its tokens, padding after); zero-length segments repeat the previous end. Left,
    right or no padding all fit. Padding rows attend only among themselves: their outputs are finite, unused and
    excluded from the loss (transformers' eager attention averages all values there instead).
    """
    b, s = attention_mask.shape
    valid = attention_mask > 0
    pos = ops.broadcast_to(ops.arange(s, dtype=ms.int64).reshape(1, s), (b, s))
    first = ops.amin(ops.where(valid, pos, ops.full_like(pos, s)), 1)
    count = valid.astype(ms.int64).sum(1).astype(ms.int64)
    start = ops.arange(b, dtype=ms.int64) * s + ops.minimum(first, s - count)
    return ops.stack((start, start + count, ops.arange(1, b + 1, dtype=ms.int64) * s), 1).reshape(-1)


class TextAttention(nn.Cell):
    def __init__(self, cfg: TextConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        h = cfg.hidden_size
        self.q_proj = Linear(h, self.num_heads * self.head_dim, True, param_dtype, compute_dtype)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, True, param_dtype, compute_dtype)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, True, param_dtype, compute_dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, False, param_dtype, compute_dtype)
        # Rows flattened to TND with three segments per row (padding before, tokens, padding after), causal inside
        # each: real tokens see exactly the earlier real tokens of their row, as with transformers' mask.
        self.attention = FlashAttention(
            self.num_heads, self.scale, "TND", sparse_mode=2, dtype=compute_dtype, head_dim=self.head_dim
        )
        self.rotary = Rotary(compute_dtype)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, segment_ends: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.rotary(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim), cos, sin)
        k = self.rotary(self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b * s, self.num_kv_heads, self.head_dim)
        shape_q, shape_kv = (b * s, self.num_heads, self.head_dim), (b * s, self.num_kv_heads, self.head_dim)
        out = self.attention(q.reshape(shape_q), k.reshape(shape_kv), v, segment_ends, segment_ends)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))


class TextMLP(nn.Cell):
    def __init__(self, cfg: TextConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, i, False, param_dtype, compute_dtype)
        self.up_proj = Linear(h, i, False, param_dtype, compute_dtype)
        self.down_proj = Linear(i, h, False, param_dtype, compute_dtype)
        self.act = SwiGLU(compute_dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: TextConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.self_attn = TextAttention(cfg, param_dtype, compute_dtype)
        self.mlp = TextMLP(cfg, param_dtype, compute_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype, compute_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype, compute_dtype)

    def construct(self, h: Tensor, cos: Tensor, sin: Tensor, segment_ends: Tensor) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, segment_ends)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Cell):
    """Embedding, decoder layers and the final norm (``thinker.model`` in transformers)."""

    def __init__(self, cfg: TextConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, param_dtype, compute_dtype)
        self.layers = nn.CellList([DecoderLayer(cfg, param_dtype, compute_dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype, compute_dtype)
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, half, dtype=np.int64).astype(np.float32) * 2 / cfg.head_dim))
        self.inv_freq = Tensor(inv_freq.astype(np.float32))
        self.axis_per_frequency = Tensor(mrope_axis_per_frequency(cfg.mrope_section, cfg.head_dim))

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def rotary(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """[3, B, S] positions -> cos, sin [B, S, 1, head_dim] with each frequency driven by its mRoPE axis."""
        pos = position_ids.transpose(1, 2, 0)  # [B, S, 3]
        pos = ops.gather(pos, self.axis_per_frequency, 2).astype(ms.float32)  # [B, S, head_dim/2]
        freqs = pos * self.inv_freq
        emb = ops.cat((freqs, freqs), -1)
        b, s, d = emb.shape
        cos = ops.cos(emb).astype(self.compute_dtype).reshape(b, s, 1, d)
        sin = ops.sin(emb).astype(self.compute_dtype).reshape(b, s, 1, d)
        return cos, sin

    def construct(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        cos, sin = self.rotary(position_ids)
        segment_ends = padded_row_segments(attention_mask)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, segment_ends)
        return self.norm(h)
