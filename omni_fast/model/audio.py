"""Qwen2.5-Omni audio encoder (``thinker.audio_tower``) in MindSpore, numerically equal to transformers 4.53.

transformers splits each audio's valid mel frames into chunks of ``2 * n_window`` (200) frames, right-pads the chunks
to the longest one, runs conv1 -> GELU -> mel mask -> conv2 (stride 2) -> GELU, adds sinusoid positions that restart
in every chunk, keeps the valid frames, runs the layers with attention confined to each chunk, and finally
average-pools (2, 2) per audio before ``ln_post`` and ``proj``.

Here every data-dependent index (chunking, padding, which conv2 outputs are valid, chunk ends, pooling pairs) is
computed once on the host by :func:`prepare_audio_inputs`; :meth:`AudioEncoder.construct` is pure tensor ops with
static shapes, so it runs the same in PyNative and under ``ms.jit``. The convs are im2col (one gather / one concat)
plus a matmul, because MindSpore's CPU conv kernels are unreliable across modes.

Input contract: ``input_features`` is [n_audio, n_mels, T_pad] with each audio's valid frames first (right padding,
as the processor gives), and ``feature_lengths[a] <= T_pad`` (= ``feature_attention_mask.sum(1)``).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from omni_fast.config.model_config import AudioConfig
from omni_fast.model.layers import LayerNorm, Linear, new_parameter
from omni_fast.ops.activation import Gelu
from omni_fast.ops.attention import FlashAttention
from omni_fast.ops.rope_index import audio_token_count

LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm default, used by every norm of the tower


def audio_output_lengths(feature_lengths: np.ndarray) -> np.ndarray:
    """Tokens per audio for each mel-frame count (conv2 stride 2, then avg-pool 2 with floor)."""
    return audio_token_count(np.asarray(feature_lengths, dtype=np.int64))


def prepare_audio_inputs(feature_lengths: np.ndarray, cfg: AudioConfig) -> tuple[np.ndarray, ...]:
    """Host-side plan for :meth:`AudioEncoder.construct` from each audio's valid mel-frame count.

    Returns, in the order ``construct`` takes them (C chunks of at most ``2 * n_window`` frames, P the longest chunk,
    P2 = (P - 1) // 2 + 1 its conv2 length, N packed valid frames after conv2, M output tokens):

    * ``tap_audio`` [C, P, 3] int32 and ``tap_frame`` [C, P, 3] int32: the (audio, frame) read by conv1 tap k at
      chunk position p. Slots outside the chunk (conv padding, right padding of short chunks) point at audio
      ``n_audio``, which ``construct`` maps to an all-zero row.
    * ``mel_mask`` [C, P, 1] float32: 1 on the chunk's valid mel frames (applied after conv1 + GELU).
    * ``keep_index`` [N] int32: rows of the flattened [C * P2] conv2 output that are valid, in audio/time order.
    * ``cu_seqlens`` [C] int64: cumulative ends of the chunks over the packed frames (attention stays inside a
      chunk).
    * ``pool_index`` [M] int32: first packed row of each avg-pool pair (the second is the next row).
    """
    lengths = np.asarray(feature_lengths)
    if lengths.ndim != 1 or lengths.size == 0:
        raise ValueError(f"feature_lengths must be a non-empty 1-D array, got shape {lengths.shape}")
    if not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"feature_lengths must be integers, got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        raise ValueError(f"audio {bad[0]}: feature length {lengths[bad[0]]} must be positive")

    n_audio = lengths.size
    chunk = 2 * cfg.n_window
    # Chunks: full ones of `chunk` frames, the last takes the remainder (a remainder of 0 means a full last chunk).
    n_chunks = -(-lengths // chunk)
    n_total = int(n_chunks.sum())
    chunk_audio = np.repeat(np.arange(n_audio), n_chunks)
    chunk_rank = np.arange(n_total) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    chunk_start = chunk_rank * chunk
    chunk_len = np.minimum(lengths[chunk_audio] - chunk_start, chunk)
    p = int(chunk_len.max())

    # conv1 (k3, pad 1) as im2col: tap k of position t reads chunk position t + k - 1 if it lies inside the chunk.
    pos = np.arange(p)
    tap_pos = pos[None, :, None] + np.arange(-1, 2)[None, None, :]
    inside = (tap_pos >= 0) & (tap_pos < chunk_len[:, None, None])
    tap_audio = np.where(inside, chunk_audio[:, None, None], n_audio)
    tap_frame = np.where(inside, chunk_start[:, None, None] + tap_pos, 0)
    mel_mask = (pos[None, :] < chunk_len[:, None]).astype(np.float32)[..., None]

    # conv2 (stride 2) keeps (len - 1) // 2 + 1 outputs per chunk; row-major order = audio, then time order.
    p2 = (p - 1) // 2 + 1
    if p2 > cfg.max_source_positions:
        raise ValueError(f"chunk of {p} frames needs {p2} positions > max_source_positions {cfg.max_source_positions}")
    cnn_len = (chunk_len - 1) // 2 + 1
    keep_index = np.flatnonzero((np.arange(p2)[None, :] < cnn_len[:, None]).reshape(-1))
    cu_seqlens = np.cumsum(cnn_len)

    # Avg-pool (2, 2, floor) per audio over that audio's packed rows.
    after_cnn = (lengths - 1) // 2 + 1
    n_out = after_cnn // 2
    audio_row0 = np.cumsum(after_cnn) - after_cnn
    out_audio = np.repeat(np.arange(n_audio), n_out)
    out_rank = np.arange(int(n_out.sum())) - np.repeat(np.cumsum(n_out) - n_out, n_out)
    pool_index = audio_row0[out_audio] + 2 * out_rank

    i32 = np.int32
    return (
        tap_audio.astype(i32),
        tap_frame.astype(i32),
        mel_mask,
        keep_index.astype(i32),
        cu_seqlens.astype(np.int64),
        pool_index.astype(i32),
    )


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """[length, channels] = [sin(t w) | cos(t w)], w_k = exp(-k ln(max_timescale) / (channels/2 - 1)).

    Rounded step by step like transformers' float32 buffer, so the rows match it to within an ulp.
    """
    if channels % 2:
        raise ValueError(f"sinusoid positions need an even channel count, got {channels}")
    increment = np.log(max_timescale) / (channels // 2 - 1)
    # float32 arguments as torch rounds them; exp/sin/cos evaluated in float64 and rounded (torch's are accurate
    # to the ulp, numpy's float32 ones are not, and an ulp in the table is visible at 1e-5 parity).
    exponent = (-increment * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
    inv = np.exp(exponent.astype(np.float64)).astype(np.float32)
    scaled = (np.arange(length, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float64)
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class Conv1dK3(nn.Cell):
    """Conv1d weights (kernel 3, torch layout [out, in, 3]) applied to im2col columns ordered (tap, channel)."""

    def __init__(self, in_channels: int, out_channels: int, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.compute_dtype = compute_dtype
        self.weight = new_parameter((out_channels, in_channels, 3), param_dtype)
        self.bias = new_parameter((out_channels,), param_dtype)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, cols: Tensor) -> Tensor:
        lead = cols.shape[:-1]
        # [out, in, 3] -> [out, 3, in] so that column k * in + c multiplies weight[:, c, k].
        w = self.weight.astype(self.compute_dtype).transpose(0, 2, 1).reshape(self.out_channels, 3 * self.in_channels)
        y = self.matmul(cols.reshape(-1, 3 * self.in_channels), w) + self.bias.astype(self.compute_dtype)
        return y.reshape(*lead, self.out_channels)


class FrozenTable(nn.Cell):
    """Holds a checkpoint tensor the forward never reads (``audio_bos_eos_token``), frozen so it gets no grad."""

    def __init__(self, rows: int, dim: int, param_dtype: ms.dtype):
        super().__init__()
        self.weight = new_parameter((rows, dim), param_dtype)
        self.weight.requires_grad = False


class AudioAttention(nn.Cell):
    """Bidirectional multi-head attention over packed frames, confined to each chunk (TND flash attention)."""

    def __init__(self, cfg: AudioConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        d = cfg.d_model
        if d % cfg.encoder_attention_heads:
            raise ValueError(f"d_model {d} is not divisible by {cfg.encoder_attention_heads} heads")
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        # Declared in transformers' order so parameters_and_names() follows the state dict.
        self.k_proj = Linear(d, d, False, param_dtype, compute_dtype)  # no bias in the checkpoint
        self.v_proj = Linear(d, d, True, param_dtype, compute_dtype)
        self.q_proj = Linear(d, d, True, param_dtype, compute_dtype)
        self.out_proj = Linear(d, d, True, param_dtype, compute_dtype)
        self.attention = FlashAttention(self.num_heads, self.scale, "TND", dtype=compute_dtype, head_dim=self.head_dim)

    def _heads(self, x: Tensor) -> Tensor:
        # [N, D] -> [N, H, hd] (TND)
        return x.reshape(x.shape[0], self.num_heads, self.head_dim)

    def construct(self, x: Tensor, cu_seqlens: Tensor) -> Tensor:
        n = x.shape[0]
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        out = self.attention(q, k, v, cu_seqlens, cu_seqlens)
        return self.out_proj(out.reshape(n, -1))


class AudioEncoderLayer(nn.Cell):
    """Pre-LN block: x += attn(LN(x)); x += fc2(gelu(fc1(LN(x))))."""

    def __init__(self, cfg: AudioConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        d = cfg.d_model
        self.self_attn = AudioAttention(cfg, param_dtype, compute_dtype)
        self.self_attn_layer_norm = LayerNorm(d, LAYER_NORM_EPS, param_dtype, compute_dtype)
        self.fc1 = Linear(d, cfg.encoder_ffn_dim, True, param_dtype, compute_dtype)
        self.fc2 = Linear(cfg.encoder_ffn_dim, d, True, param_dtype, compute_dtype)
        self.final_layer_norm = LayerNorm(d, LAYER_NORM_EPS, param_dtype, compute_dtype)
        self.act = Gelu(compute_dtype)

    def construct(self, x: Tensor, cu_seqlens: Tensor) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cu_seqlens)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Cell):
    """``thinker.audio_tower``: padded mel features of several audios -> their LLM-space tokens, concatenated."""

    def __init__(self, cfg: AudioConfig, param_dtype: ms.dtype = ms.float32, compute_dtype: ms.dtype = ms.float32):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.d_model = d
        self.num_mel_bins = cfg.num_mel_bins
        self.compute_dtype = compute_dtype
        self.conv1 = Conv1dK3(cfg.num_mel_bins, d, param_dtype, compute_dtype)
        self.conv2 = Conv1dK3(d, d, param_dtype, compute_dtype)
        self.act = Gelu(compute_dtype)
        self.audio_bos_eos_token = FrozenTable(2, cfg.output_dim, param_dtype)
        self.layers = nn.CellList(
            [AudioEncoderLayer(cfg, param_dtype, compute_dtype) for _ in range(cfg.encoder_layers)]
        )
        self.ln_post = LayerNorm(d, LAYER_NORM_EPS, param_dtype, compute_dtype)
        self.proj = Linear(d, cfg.output_dim, True, param_dtype, compute_dtype)
        # Non-persistent constant (not a Parameter): recomputed, never saved or trained.
        self.positions = Tensor(sinusoid_table(cfg.max_source_positions, d))

    def construct(
        self,
        input_features: Tensor,
        tap_audio: Tensor,
        tap_frame: Tensor,
        mel_mask: Tensor,
        keep_index: Tensor,
        cu_seqlens: Tensor,
        pool_index: Tensor,
    ) -> Tensor:
        """[n_audio, n_mels, T_pad] + the arrays of :func:`prepare_audio_inputs` -> [M, output_dim]."""
        x = self.front(input_features, tap_audio, tap_frame, mel_mask, keep_index)
        for layer in self.layers:
            x = layer(x, cu_seqlens)
        return self.back(x, pool_index)

    # front / back are the parts before and after the layers, separate so that pipeline stages can split the tower.
    def front(
        self, input_features: Tensor, tap_audio: Tensor, tap_frame: Tensor, mel_mask: Tensor, keep_index: Tensor
    ) -> Tensor:
        """Convolutions and positions: padded mel features -> packed valid frames [N, d_model]."""
        cd = self.compute_dtype
        n_audio, n_mels, t_pad = input_features.shape
        n_chunks, p, _ = tap_audio.shape
        d = self.d_model

        # Frames as rows, plus one zero row (index n_audio * t_pad) that every out-of-chunk tap reads.
        frames = input_features.astype(cd).transpose(0, 2, 1).reshape(n_audio * t_pad, n_mels)
        frames = ops.cat((frames, ops.zeros((1, n_mels), cd)), 0)
        flat = (tap_audio * t_pad + tap_frame).reshape(-1)
        cols = ops.gather(frames, flat, 0).reshape(n_chunks, p, 3 * n_mels)
        h = self.act(self.conv1(cols)) * mel_mask.astype(cd)

        # conv2 (k3, stride 2, pad 1): pad to 2 * p2 + 2 rows, pair rows up, and output j reads rows 2j, 2j+1, 2j+2.
        p2 = (p - 1) // 2 + 1
        h = ops.cat((ops.zeros((n_chunks, 1, d), cd), h, ops.zeros((n_chunks, 2 * p2 + 1 - p, d), cd)), 1)
        pairs = h.reshape(n_chunks, p2 + 1, 2 * d)
        # ops.slice, not pairs[:, 1:, :d]: MindSpore's CPU StridedSlice over two axes took 3.4 ms here, this 0.2 ms.
        cols = ops.cat((pairs[:, :p2], ops.slice(pairs, (0, 1, 0), (n_chunks, p2, d))), -1)
        h = self.act(self.conv2(cols)) + self.positions[:p2].astype(cd)  # positions restart in every chunk
        return ops.gather(h.reshape(n_chunks * p2, d), keep_index, 0)

    def back(self, x: Tensor, pool_index: Tensor) -> Tensor:
        """Average-pool pairs of frames per audio, ln_post, proj -> [M, output_dim]."""
        pooled = (ops.gather(x, pool_index, 0) + ops.gather(x, pool_index + 1, 0)) * 0.5
        return self.proj(self.ln_post(pooled))
