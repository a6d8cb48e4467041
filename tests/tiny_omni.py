"""Tiny random Qwen2.5-Omni checkpoints built with transformers (test-only; needs torch).

Token ids follow the tiny tokenizer layout (hub id - 150643), so that sequences look like real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY_IDS = {
    "pad": 1000,
    "im_start": 1001,
    "im_end": 1002,
    "audio": 1003,
    "audio_bos": 1004,
    "audio_eos": 1005,
    "vision_bos": 1009,
    "vision_eos": 1010,
    "image": 1012,
    "video": 1013,
}


def tiny_thinker_config_dict() -> dict:
    """A thinker config (transformers field names) small enough for fast parity tests."""
    return {
        "model_type": "qwen2_5_omni_thinker",
        "audio_token_index": TINY_IDS["audio"],
        "image_token_index": TINY_IDS["image"],
        "video_token_index": TINY_IDS["video"],
        "audio_start_token_id": TINY_IDS["audio_bos"],
        "audio_end_token_id": TINY_IDS["audio_eos"],
        "vision_start_token_id": TINY_IDS["vision_bos"],
        "vision_end_token_id": TINY_IDS["vision_eos"],
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
        "text_config": {
            "vocab_size": 1024,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            "rms_norm_eps": 1e-6,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "audio_config": {
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "num_mel_bins": 128,
            "n_window": 100,
            "output_dim": 64,
            "max_source_positions": 1500,
        },
    }


def build_hf_thinker(config_dict: dict | None = None, seed: int = 0, attn_implementation: str = "eager"):
    """A transformers thinker with every parameter perturbed so norms and biases are not trivial."""
    import torch
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5OmniThinkerConfig(**(config_dict or tiny_thinker_config_dict()))
    cfg._attn_implementation = attn_implementation
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def save_hf_thinker(model, out: Path, *, full: bool = False, dtype: str = "float32", shards: int = 1) -> Path:
    """Write config.json and safetensors like the hub does (``full`` adds the ``thinker.`` prefix and a top config)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in model.state_dict().items()}
    thinker_cfg = model.config.to_dict()
    if full:
        state = {f"thinker.{k}": v for k, v in state.items()}
        state["talker.model.embed_tokens.weight"] = torch.zeros(4, 8, dtype=torch_dtype)
        state["token2wav.code_embedding.weight"] = torch.zeros(2, 3, dtype=torch_dtype)
        config = {"model_type": "qwen2_5_omni", "thinker_config": thinker_cfg, "enable_audio_output": False}
    else:
        config = thinker_cfg
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def to_numpy(t) -> np.ndarray:
    return t.detach().float().numpy() if hasattr(t, "detach") else np.asarray(t)
