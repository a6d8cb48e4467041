"""Qwen2.5-Omni vision tower (``thinker.visual``) in MindSpore, numerically equal to transformers 4.53.

The work splits in two:

* ``prepare_vision_inputs`` (numpy, on the host) turns ``grid_thw`` into everything that depends on the data:
  the window permutation of 2x2 merge units and its inverse, the cumulative segment ends for windowed and for full
  (per temporal slice) attention, and the (row, col) rotary position of every patch.
* ``VisionEncoder.construct`` is then pure tensor ops (gather, matmul, elementwise), so it runs in PyNative and
  compiles under ``ms.jit`` on CPU. Block-diagonal attention is variable-length (TND) flash attention over the
  windows or the temporal slices, instead of transformers' per-layer Python loop over segments.

Parameter names equal the transformers state-dict names of ``visual`` (without the prefix).
"""

from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from omni_fast.config.model_config import VisionConfig
from omni_fast.model.layers import Linear, RMSNorm, new_parameter
from omni_fast.ops.activation import Gelu, SwiGLU
from omni_fast.ops.attention import FlashAttention
from omni_fast.ops.rotary import Rotary

# transformers hard-codes these for the vision tower (not read from the config).
_NORM_EPS = 1e-6
_ROPE_THETA = 10000.0


class VisionPlan(NamedTuple):
    """Host-side plan for one ``VisionEncoder`` call; pass as ``enc(pixel_values, *plan)`` (after ``Tensor``)."""

    window_index: np.ndarray  # [N/m^2] int32: merge unit at each windowed position (raster -> window order)
    reverse_index: np.ndarray  # [N/m^2] int32: inverse permutation (window -> raster order)
    window_cu_seqlens: np.ndarray  # [windows] int64: cumulative patch ends of the windows, in window order
    full_cu_seqlens: np.ndarray  # [slices] int64: cumulative patch ends of the temporal slices, in window order
    rotary_pos_ids: np.ndarray  # [N, 2] int32: (row, col) of each patch in its frame, in window order


def prepare_vision_inputs(grid_thw: np.ndarray, cfg: VisionConfig) -> VisionPlan:
    """Plan the window permutation, attention segments and rotary positions for a batch of images or videos.

    ``grid_thw`` is [n, 3] (temporal, height, width in patches). Pixel rows are expected per item in the order
    (t, h/m, w/m, m, m), as the processor emits them. Vectorised per item (one loop step per image/video).
    """
    grid = np.asarray(grid_thw)
    if grid.ndim == 1:
        grid = grid.reshape(1, -1)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape [n, 3] with n >= 1, got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid_thw must be integer, got {grid.dtype}")
    if (grid <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
    m = cfg.spatial_merge_size
    if (grid[:, 1:] % m != 0).any():
        raise ValueError(f"grid h and w must be multiples of spatial_merge_size={m}, got {grid.tolist()}")
    win = cfg.window_size // m // cfg.patch_size  # window side in merge units (4 for 112 / 2 / 14)
    if win < 1:
        raise ValueError(f"window_size={cfg.window_size} is smaller than one merge unit")

    window_index, window_sizes, slice_sizes, pos_ids = [], [], [], []
    unit_offset = 0
    for t, h, w in grid.tolist():
        lh, lw = h // m, w // m
        nh, nw = -(-lh // win), -(-lw // win)  # windows per axis; the last row/column may be partial
        # Merge-unit ids in raster order, padded with -1 to whole windows, then laid out window by window.
        padded = np.full((t, nh * win, nw * win), -1, dtype=np.int64)
        padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        tiles = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        valid = tiles >= 0
        window_index.append(tiles[valid] + unit_offset)
        window_sizes.append(valid.sum(-1).reshape(-1))  # merge units per window (a partial window is smaller)
        slice_sizes.append(np.full(t, lh * lw))
        # (row, col) of every patch in raster merge-block order (lh, lw, m, m), the same for each temporal slice.
        rows = np.arange(lh).reshape(lh, 1, 1, 1) * m + np.arange(m).reshape(1, 1, m, 1)
        cols = np.arange(lw).reshape(1, lw, 1, 1) * m + np.arange(m).reshape(1, 1, 1, m)
        rc = np.stack(np.broadcast_arrays(rows, cols), axis=-1).reshape(1, lh * lw * m * m, 2)
        pos_ids.append(np.broadcast_to(rc, (t, lh * lw * m * m, 2)).reshape(-1, 2))
        unit_offset += t * lh * lw

    unit = m * m
    window_index = np.concatenate(window_index)
    # Patches of a merge unit stay together: patch counts are unit counts times m^2. Every window holds at least
    # one unit (the window grid is the ceiling of the unit grid), so no segment is empty.
    window_cu_seqlens = np.cumsum(np.concatenate(window_sizes)) * unit
    full_cu_seqlens = np.cumsum(np.concatenate(slice_sizes)) * unit
    rotary = np.concatenate(pos_ids).reshape(-1, unit, 2)[window_index].reshape(-1, 2)
    return VisionPlan(
        window_index=window_index.astype(np.int32),
        reverse_index=np.argsort(window_index, kind="stable").astype(np.int32),
        window_cu_seqlens=window_cu_seqlens.astype(np.int64),
        full_cu_seqlens=full_cu_seqlens.astype(np.int64),
        rotary_pos_ids=rotary.astype(np.int32),
    )


class PatchProjection(nn.Cell):
    """Conv3d with kernel == stride and no bias, computed as a matmul; the weight keeps the 5-D Conv3d shape."""

    def __init__(self, cfg: VisionConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.out_features = cfg.hidden_size
        self.in_features = cfg.patch_dim
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.weight = new_parameter(shape, param_dtype)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        w = self.weight.astype(self.compute_dtype).reshape(self.out_features, self.in_features)
        return self.matmul(x.reshape(-1, self.in_features).astype(self.compute_dtype), w)


class PatchEmbed(nn.Cell):
    def __init__(self, cfg: VisionConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.proj = PatchProjection(cfg, param_dtype, compute_dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.proj(x)


class VisionAttention(nn.Cell):
    """Multi-head self-attention with separate q/k/v (with bias), 2-D rotary on q and k, within segments."""

    def __init__(self, cfg: VisionConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        dim = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.q = Linear(dim, dim, True, param_dtype, compute_dtype)
        self.k = Linear(dim, dim, True, param_dtype, compute_dtype)
        self.v = Linear(dim, dim, True, param_dtype, compute_dtype)
        self.proj = Linear(dim, dim, True, param_dtype, compute_dtype)
        self.attention = FlashAttention(self.num_heads, self.scale, "TND", dtype=compute_dtype, head_dim=self.head_dim)
        self.rotary = Rotary(ms.float32)

    def _heads(self, x: Tensor) -> Tensor:
        """[S, H*D] -> [S, H, D] (TND)."""
        return x.reshape(x.shape[0], self.num_heads, self.head_dim)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor) -> Tensor:
        s = x.shape[0]
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        # Rotary in float32 like transformers, then back to the compute dtype.
        q = self.rotary(q.astype(ms.float32), cos, sin).astype(x.dtype)
        k = self.rotary(k.astype(ms.float32), cos, sin).astype(x.dtype)
        out = self.attention(q, k, v, cu_seqlens, cu_seqlens)
        return self.proj(out.reshape(s, self.num_heads * self.head_dim))


class VisionMLP(nn.Cell):
    """Gated MLP with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: VisionConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, True, param_dtype, compute_dtype)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, True, param_dtype, compute_dtype)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, True, param_dtype, compute_dtype)
        self.act = SwiGLU(compute_dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class VisionBlock(nn.Cell):
    def __init__(self, cfg: VisionConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, _NORM_EPS, param_dtype, compute_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, _NORM_EPS, param_dtype, compute_dtype)
        self.attn = VisionAttention(cfg, param_dtype, compute_dtype)
        self.mlp = VisionMLP(cfg, param_dtype, compute_dtype)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Cell):
    """RMSNorm, then each m x m merge unit (consecutive rows) concatenated and projected by a 2-layer MLP."""

    def __init__(self, cfg: VisionConfig, param_dtype: ms.dtype, compute_dtype: ms.dtype):
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, _NORM_EPS, param_dtype, compute_dtype)
        self.mlp = nn.SequentialCell(
            Linear(self.merged_dim, self.merged_dim, True, param_dtype, compute_dtype),
            Gelu(compute_dtype),
            Linear(self.merged_dim, cfg.out_hidden_size, True, param_dtype, compute_dtype),
        )

    def construct(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))


class VisionEncoder(nn.Cell):
    """``Qwen2_5OmniVisionEncoder``: patches [N, C*T*P*P] -> merged features [N/m^2, out_hidden_size].

    Call as ``enc(pixel_values, *map(Tensor, prepare_vision_inputs(grid_thw, cfg)))``.
    """

    def __init__(self, cfg: VisionConfig, param_dtype: ms.dtype = ms.float32, compute_dtype: ms.dtype = ms.float32):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.hidden_size = cfg.hidden_size
        self.unit = cfg.spatial_merge_size**2
        full = set(cfg.fullatt_block_indexes)
        self.full_attention = tuple(i in full for i in range(cfg.depth))
        self.patch_embed = PatchEmbed(cfg, param_dtype, compute_dtype)
        self.blocks = nn.CellList([VisionBlock(cfg, param_dtype, compute_dtype) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, param_dtype, compute_dtype)
        # head_dim/4 frequencies per axis, as transformers' rotary of dim head_dim/2 (float32 constant, no grad).
        rot_dim = cfg.head_dim // 2
        inv_freq = 1.0 / (_ROPE_THETA ** (np.arange(0, rot_dim, 2, dtype=np.float32) / np.float32(rot_dim)))
        self.inv_freq = Tensor(inv_freq.astype(np.float32).reshape(1, 1, -1))

    def rotary_cos_sin(self, pos_ids: Tensor) -> tuple[Tensor, Tensor]:
        """[S, 2] (row, col) -> cos, sin of shape [S, 1, head_dim], layout [row, col, row, col] frequencies."""
        s = pos_ids.shape[0]
        freqs = (pos_ids.astype(ms.float32).reshape(s, 2, 1) * self.inv_freq).reshape(s, -1)
        emb = ops.cat((freqs, freqs), -1).reshape(s, 1, -1)
        return ops.cos(emb), ops.sin(emb)

    def construct(
        self,
        pixel_values: Tensor,
        window_index: Tensor,
        reverse_index: Tensor,
        window_cu_seqlens: Tensor,
        full_cu_seqlens: Tensor,
        rotary_pos_ids: Tensor,
    ) -> Tensor:
        x = self.front(pixel_values, window_index)
        cos, sin = self.rotary_cos_sin(rotary_pos_ids)
        for i in range(len(self.blocks)):
            cu_seqlens = full_cu_seqlens if self.full_attention[i] else window_cu_seqlens
            x = self.blocks[i](x, cos, sin, cu_seqlens)
        return self.back(x, reverse_index)

    # front / back are the parts before and after the blocks, separate so that pipeline stages can split the tower.
    def front(self, pixel_values: Tensor, window_index: Tensor) -> Tensor:
        """Patch embedding, then window order: whole merge units moved so each window (and slice) is contiguous."""
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        x = ops.gather(x.reshape(n // self.unit, self.unit, self.hidden_size), window_index, 0)
        return x.reshape(n, self.hidden_size)

    def back(self, x: Tensor, reverse_index: Tensor) -> Tensor:
        """Merger, then the window permutation undone (raster merge order)."""
        return ops.gather(self.merger(x), reverse_index, 0)
