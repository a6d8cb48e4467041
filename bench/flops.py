"""Matmul FLOPs of one Thinker training step (forward + backward), counted layer by layer from the config.

We count every matmul-shaped product (linear layers, the vision patch projection, the audio convolutions as
im2col matmuls, the lm_head, and the two attention products QK^T and PV) at 2 FLOPs per multiply-add.
Attention is counted only over the key blocks a query may attend to (lower triangle for the causal text
decoder, the window or temporal slice for vision, the chunk for audio): that is the model's useful work. Both
implementations benchmarked here execute dense attention with an additive mask, so they do more than this.

Backward = 2x forward (one product for the input gradient, one for the weight gradient), except for the two
layers fed directly by data (vision patch projection, audio conv1), which need only the weight gradient.
Elementwise work (norms, activations, softmax, RoPE, loss) is not counted.
"""

from __future__ import annotations

import numpy as np

from omni_fast.config.model_config import ThinkerConfig


def _attention(segment_sizes: np.ndarray, width: int, causal: bool = False) -> float:
    """QK^T plus PV over ``width`` channels (all heads), for self-attention inside each segment."""
    sizes = segment_sizes.astype(np.float64)
    pairs = sizes * (sizes + 1) / 2 if causal else sizes * sizes
    return float(2 * 2 * pairs.sum() * width)


def text_forward_flops(cfg: ThinkerConfig, tokens: int) -> dict[str, float]:
    t = cfg.text
    kv = t.num_key_value_heads * t.head_dim
    per_token = (
        2 * t.hidden_size * t.hidden_size  # q_proj + o_proj
        + 2 * t.hidden_size * kv  # k_proj + v_proj
        + 3 * t.hidden_size * t.intermediate_size  # gate, up, down
    )
    layers = t.num_hidden_layers * (2 * tokens * per_token + _attention(np.array([tokens]), t.hidden_size, True))
    return {"text": layers, "lm_head": 2.0 * tokens * t.hidden_size * t.vocab_size}


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
    merger = 2 * (patches // v.spatial_merge_size**2) * merged * (merged + v.out_hidden_size)
    return {
        "vision_input": 2.0 * patches * v.patch_dim * v.hidden_size,
        "vision": 2.0 * patches * per_patch * v.depth + attention + merger,
    }


def audio_forward_flops(cfg: ThinkerConfig, frames: int) -> dict[str, float]:
    """One audio of ``frames`` valid mel frames."""
    a = cfg.audio
    d = a.d_model
    chunks = audio_chunks(cfg, frames)
    positions = int(chunks.sum())
    tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1  # after conv2 and the 2x average pool
    per_position = 4 * d * d + 2 * d * a.encoder_ffn_dim  # q, k, v, out; fc1, fc2
    layers = a.encoder_layers * (2 * positions * per_position + _attention(chunks, d))
    return {
        "audio_input": 2.0 * frames * 3 * a.num_mel_bins * d,  # conv1 (kernel 3) on every valid frame
        "audio": 2.0 * positions * 3 * d * d + layers + 2.0 * tokens * d * a.output_dim,  # conv2, layers, proj
    }


def thinker_training_flops(
    cfg: ThinkerConfig,
    tokens: int,
    image_grid_thw: np.ndarray | None = None,
    audio_frames: list[int] | tuple[int, ...] = (),
) -> float:
    """Matmul FLOPs of one fwd+bwd step on ``tokens`` text positions with these images and audios."""
    forward = text_forward_flops(cfg, tokens)
    if image_grid_thw is not None:
        forward.update(vision_forward_flops(cfg, image_grid_thw))
    for frames in audio_frames:
        for name, value in audio_forward_flops(cfg, int(frames)).items():
            forward[name] = forward.get(name, 0.0) + value
    return training_flops(forward)


def training_flops(forward: dict[str, float]) -> float:
    """Forward + backward: 3x forward, 2x for the layers fed by data (no input gradient)."""
    return sum(value * (2 if name.endswith("_input") else 3) for name, value in forward.items())
