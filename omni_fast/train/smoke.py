"""A forward+backward smoke run of a tiny random Thinker on a synthetic multimodal batch.

This is what ``python -m omni_fast.train`` runs with no arguments until the full trainer lands (issue #6): it
exercises the whole model (audio tower, vision tower, text decoder, fused RMSNorm kernel) under ``ms.jit`` with
an AdamW update, and prints the loss of each step and the throughput. It reads no data and saves nothing.
"""

from __future__ import annotations

import time

import mindspore as ms
import numpy as np

from omni_fast.config.model_config import AudioConfig, TextConfig, ThinkerConfig, VisionConfig
from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.model.audio import audio_output_lengths


def tiny_config() -> ThinkerConfig:
    """A ~1M-parameter Thinker with the real layout (GQA, window + full vision blocks, chunked audio)."""
    return ThinkerConfig(
        text=TextConfig(
            vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 6, 6],
        ),
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                            fullatt_block_indexes=[1]),
        audio=AudioConfig(encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128, d_model=64,
                          output_dim=128),
        audio_token_id=1003, image_token_id=1012, video_token_id=1013,
        vision_start_token_id=1009, audio_start_token_id=1004,
    )


def synthetic_batch(cfg: ThinkerConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """One row: text, an image (grid 1x8x12 -> 24 tokens), text, a 3 s audio (75 tokens), text."""
    rng = np.random.default_rng(seed)
    grid = np.array([[1, 8, 12]])
    mel_frames = 300
    audio_tokens = int(audio_output_lengths(np.array([mel_frames]))[0])
    text = lambda n: list(rng.integers(0, 1000, n))  # noqa: E731
    ids = (
        text(12) + [cfg.vision_start_token_id] + [cfg.image_token_id] * int(grid.prod() // 4) + [1010]
        + text(8) + [cfg.audio_start_token_id] + [cfg.audio_token_id] * audio_tokens + [1005] + text(40)
    )
    input_ids = np.array([ids], dtype=np.int64)
    labels = input_ids.copy()
    labels[(input_ids == cfg.image_token_id) | (input_ids == cfg.audio_token_id)] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "pixel_values": rng.standard_normal((int(grid.prod()), cfg.vision.patch_dim)).astype(np.float32),
        "image_grid_thw": grid,
        "input_features": rng.standard_normal((1, cfg.audio.num_mel_bins, mel_frames)).astype(np.float32),
        "feature_attention_mask": np.ones((1, mel_frames), np.int32),
        "labels": labels,
    }


def run(steps: int = 8, lr: float = 2e-3) -> list[float]:
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    cfg = tiny_config()
    model = Qwen2_5OmniThinker(cfg)
    model.init_random(seed=0)
    n_params = sum(int(np.prod(p.shape)) for p in model.trainable_params())
    batch = model.prepare_batch(**synthetic_batch(cfg)).arguments()
    params = model.trainable_params()
    optimizer = ms.nn.AdamWeightDecay(params, learning_rate=lr, weight_decay=0.0)

    def loss_fn(*args):
        return model.compute(*args)[1]

    grad_fn = ms.value_and_grad(loss_fn, None, params)

    @ms.jit
    def train_step(*args):
        loss, grads = grad_fn(*args)
        optimizer(grads)
        return loss

    print("omni_fast smoke run: forward+backward of a tiny random Thinker on one synthetic image+audio+text row.")
    print("(The full trainer with data.json/model.json lands with issue #6; this run reads no data, saves nothing.)")
    print(f"parameters: {n_params:,}  tokens per step: {batch[0].shape[1]}")
    losses = []
    for step in range(steps):
        start = time.perf_counter()
        loss = float(train_step(*batch).asnumpy())
        elapsed = time.perf_counter() - start
        losses.append(loss)
        note = " (includes graph compilation)" if step == 0 else ""
        print(f"step {step + 1}/{steps}  loss {loss:.4f}  {elapsed * 1000:.0f} ms{note}")
    trend = "falling" if losses[-1] < losses[0] else "NOT falling"
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({trend})")
    return losses
