"""Matmul FLOPs of one Thinker training step (forward + backward), counted layer by layer from the config and batch.

The trainer divides them by the step time and the cores' FMA ceiling for its MFU; the benchmarks report them as
GFLOP/s.

We count every matmul-shaped product (linear layers, the vision patch projection, the audio convolutions as
im2col matmuls, the lm_head, and the two attention products QK^T and PV) at 2 FLOPs per multiply-add.
Attention is counted only over the key blocks a query may attend to (lower triangle for the causal text
decoder, the window or temporal slice for vision, the chunk for audio): that is the model's useful work. Both
implementations benchmarked here execute dense attention with an additive mask, so they do more than this.

Backward = 2x forward for a trained module (one product for the input gradient, one for the weight gradient), except
for the two layers fed directly by data (vision patch projection, audio conv1), which need only the weight gradient;
1x for a frozen module that gradients must still cross (the text decoder, or the vision merger, in front of trained
encoders); nothing for a frozen module with nothing trained behind it. Elementwise work (norms, activations, softmax,
RoPE, loss) and the embedding lookup are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from omni_fast.config.model_config import ThinkerConfig


def _attention(segment_sizes: np.ndarray, width: int, causal: bool = False) -> float:
    """QK^T plus PV over ``width`` channels (all heads), for self-attention inside each segment."""
    sizes = segment_sizes.astype(np.float64)
    pairs = sizes * (sizes + 1) / 2 if causal else sizes * sizes
    return float(2 * 2 * pairs.sum() * width)


def text_forward_flops(cfg: ThinkerConfig, rows: int, seq: int) -> dict[str, float]:
    """``rows`` rows of ``seq`` positions (padding included: the decoder computes it), causal attention per row."""
    t = cfg.text
    tokens = rows * seq
    kv = t.num_key_value_heads * t.head_dim
    per_token = (
        2 * t.hidden_size * t.hidden_size  # q_proj + o_proj
        + 2 * t.hidden_size * kv  # k_proj + v_proj
        + 3 * t.hidden_size * t.intermediate_size  # gate, up, down
    )
    return {
        "text": 2.0 * t.num_hidden_layers * tokens * per_token,
        "text_attention": t.num_hidden_layers * _attention(np.full(rows, seq), t.hidden_size, True),
        "lm_head": 2.0 * tokens * t.hidden_size * t.vocab_size,
    }


def vision_segments(cfg: ThinkerConfig, grid_thw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patches per attention window and per temporal slice (full-attention segment), from the [n, 3] grids.

    Windows tile each frame in ``window_size / patch_size`` squares of patches, aligned to the top-left corner;
    the last row and column of windows may be partial (transformers' ``get_window_index``).
    """
    v = cfg.vision
    side = v.window_size // v.patch_size  # window side in patches (8 for 112 / 14)
    windows, slices = [], []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
        rows = [min(side, h - r) for r in range(0, h, side)]
        cols = [min(side, w - c) for c in range(0, w, side)]
        windows += [r * c for _ in range(t) for r in rows for c in cols]
        slices += [h * w] * t
    return np.array(windows), np.array(slices)


def audio_chunks(cfg: ThinkerConfig, frames: int) -> np.ndarray:
    """Encoder positions per attention chunk: ``2 * n_window`` mel frames per chunk, halved by conv2's stride."""
    size = 2 * cfg.audio.n_window
    lengths = [min(size, frames - start) for start in range(0, frames, size)]
    return np.array([(n - 1) // 2 + 1 for n in lengths])


def vision_forward_flops(cfg: ThinkerConfig, grid_thw: np.ndarray) -> dict[str, float]:
    v = cfg.vision
    windows, slices = vision_segments(cfg, grid_thw)
    patches = int(slices.sum())
    merged = v.hidden_size * v.spatial_merge_size**2
    per_patch = 4 * v.hidden_size * v.hidden_size + 3 * v.hidden_size * v.intermediate_size  # q, k, v, proj; MLP
    attention = sum(
        _attention(slices if i in v.fullatt_block_indexes else windows, v.hidden_size) for i in range(v.depth)
    )
    return {
        "vision_input": 2.0 * patches * v.patch_dim * v.hidden_size,
        "vision": 2.0 * patches * per_patch * v.depth,
        "vision_attention": attention,
        "vision_merger": 2.0 * (patches // v.spatial_merge_size**2) * merged * (merged + v.out_hidden_size),
    }


def audio_forward_flops(cfg: ThinkerConfig, frames: int) -> dict[str, float]:
    """One audio of ``frames`` valid mel frames."""
    a = cfg.audio
    d = a.d_model
    chunks = audio_chunks(cfg, frames)
    positions = int(chunks.sum())
    tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1  # after conv2 and the 2x average pool
    per_position = 4 * d * d + 2 * d * a.encoder_ffn_dim  # q, k, v, out; fc1, fc2
    layers = 2.0 * a.encoder_layers * positions * per_position
    return {
        "audio_input": 2.0 * frames * 3 * a.num_mel_bins * d,  # conv1 (kernel 3) on every valid frame
        "audio": 2.0 * positions * 3 * d * d + layers + 2.0 * tokens * d * a.output_dim,  # conv2, layers, proj
        "audio_attention": a.encoder_layers * _attention(chunks, d),
    }


# Which trainer module (model.json's freeze keys) each counted part belongs to.
PART_MODULE = {
    "text": "text_decoder",
    "text_attention": "text_decoder",
    "lm_head": "text_decoder",
    "vision_input": "vision_encoder",
    "vision": "vision_encoder",
    "vision_attention": "vision_encoder",
    "vision_merger": "vision_projector",
    "audio_input": "audio_encoder",
    "audio": "audio_encoder",
    "audio_attention": "audio_encoder",
}
ALL_TRAINED = dict.fromkeys(PART_MODULE.values(), True)


def backward_factor(part: str, trained: Mapping[str, bool]) -> float:
    """Backward FLOPs of ``part`` per forward FLOP: 2 trained (1 when fed by data), 1 frozen but crossed by the
    gradient of a trained module behind it, 0 otherwise."""
    if trained[PART_MODULE[part]]:
        return 1.0 if part.endswith("_input") else 2.0
    behind = {
        "text_decoder": ("vision_encoder", "vision_projector", "audio_encoder"),
        "vision_projector": ("vision_encoder",),
    }.get(PART_MODULE[part], ())
    return 1.0 if any(trained[m] for m in behind) else 0.0


def training_flops_by_part(
    cfg: ThinkerConfig, batch: Mapping[str, Any], trained: Mapping[str, bool] = ALL_TRAINED
) -> dict[str, float]:
    """Matmul FLOPs of one fwd+bwd step per part (``PART_MODULE``) on a batch of model inputs (``input_ids`` [B, S];
    ``image_grid_thw``, ``video_grid_thw`` and ``feature_attention_mask`` where present), given which modules are
    trained."""
    forward = text_forward_flops(cfg, *np.shape(batch["input_ids"]))
    media = ("image_grid_thw", "video_grid_thw")
    grids = [np.asarray(batch[k]).reshape(-1, 3) for k in media if batch.get(k) is not None]
    if grids:
        forward.update(vision_forward_flops(cfg, np.concatenate(grids)))
    mask = batch.get("feature_attention_mask")
    for frames in np.asarray(mask).sum(-1) if mask is not None else ():
        for name, value in audio_forward_flops(cfg, int(frames)).items():
            forward[name] = forward.get(name, 0.0) + value
    return {name: value * (1.0 + backward_factor(name, trained)) for name, value in forward.items()}


def training_flops(cfg: ThinkerConfig, batch: Mapping[str, Any], trained: Mapping[str, bool] = ALL_TRAINED) -> float:
    """The step's total: the sum of :func:`training_flops_by_part`."""
    return sum(training_flops_by_part(cfg, batch, trained).values())
