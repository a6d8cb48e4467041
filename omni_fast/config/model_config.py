"""Structure of the Qwen2.5-Omni Thinker, read from a Hugging Face ``config.json``.

Field names and defaults follow transformers 4.53's ``Qwen2_5Omni*Config`` classes so that a hub
``config.json`` (full ``Qwen2_5OmniConfig`` with ``thinker_config``, or a bare thinker config) maps 1:1.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _pick(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


@dataclass
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TextConfig:
        cfg = cls(**_pick(cls, raw))
        if raw.get("num_key_value_heads") is None:
            cfg.num_key_value_heads = cfg.num_attention_heads
        scaling = raw.get("rope_scaling") or {}
        if "mrope_section" in scaling:
            cfg.mrope_section = list(scaling["mrope_section"])
        return cfg


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 3584
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        return cls(**_pick(cls, raw))


@dataclass
class AudioConfig:
    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AudioConfig:
        return cls(**_pick(cls, raw))


@dataclass
class ThinkerConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    audio_start_token_id: int = 151647
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ThinkerConfig:
        """Accept a full ``Qwen2_5OmniConfig`` dict (with ``thinker_config``) or a thinker dict."""
        if "thinker_config" in raw:
            raw = raw["thinker_config"]
        ids = {
            "audio_token_id": raw.get("audio_token_index", raw.get("audio_token_id", 151646)),
            "image_token_id": raw.get("image_token_index", raw.get("image_token_id", 151655)),
            "video_token_id": raw.get("video_token_index", raw.get("video_token_id", 151656)),
        }
        scalars = _pick(cls, {k: v for k, v in raw.items() if k not in ids})
        return cls(
            text=TextConfig.from_dict(raw.get("text_config") or {}),
            vision=VisionConfig.from_dict(raw.get("vision_config") or {}),
            audio=AudioConfig.from_dict(raw.get("audio_config") or {}),
            **ids,
            **{k: v for k, v in scalars.items() if k not in ("text", "vision", "audio")},
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ThinkerConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json in the model directory") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(raw)
