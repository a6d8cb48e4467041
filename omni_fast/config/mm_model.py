"""``model.json`` with MindSpeed-MM's keys: the Thinker's structure, what is frozen, and the pipeline layout.

Keys read (see ``examples/qwen2.5omni/model_7b.json``): ``image_encoder.vision_encoder`` (num_layers, hidden_size,
ffn_hidden_size, num_attention_heads, patch_size, spatial_merge_size, temporal_patch_size, window_attn_size,
fullatt_block_indexes, in_channels, freeze, pipeline_num_layers), ``image_encoder.vision_projector`` (hidden_size,
freeze), ``audio_encoder.audio_encoder`` (num_layers, hidden_size/d_model, ffn_hidden_size, num_attention_heads,
num_mel_bins, max_source_positions, n_window, output_dim, freeze, pipeline_num_layers), ``text_decoder``
(num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, vocab_size, rope_theta,
mrope_section, layernorm_epsilon, freeze, pipeline_num_layers), ``img_context_token_id``,
``vision_start_token_id``, ``audio_start_token_id``, and ``recompute_*`` in any module.
omni_fast extensions (optional, for models with other token ids such as tiny test models): ``image_token_id``,
``video_token_id``, ``audio_token_id``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_fast.config.model_config import AudioConfig, TextConfig, ThinkerConfig, VisionConfig

MODULES = ("vision_encoder", "vision_projector", "audio_encoder", "text_decoder")


@dataclass
class ModelSpec:
    """What model.json says: the Thinker config plus training-structure settings."""

    thinker: ThinkerConfig
    freeze: dict[str, bool]  # module -> frozen
    pipeline_num_layers: dict[str, list[int] | None]  # module -> layers per stage
    img_context_token_id: int | None = None
    recompute: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> recompute_* keys
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_thinker(cls, thinker: ThinkerConfig) -> ModelSpec:
        """Defaults of the reference when there is no model.json: encoders frozen, projector and LLM trained."""
        return cls(
            thinker=thinker,
            freeze={"vision_encoder": True, "vision_projector": False, "audio_encoder": True, "text_decoder": False},
            pipeline_num_layers=dict.fromkeys(MODULES),
        )


def _get(section: dict, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in section and section[key] is not None:
            return section[key]
    return default


def load_model_json(path: str | Path) -> ModelSpec:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--mm-model {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--mm-model {path}: not valid JSON ({err})") from None
    try:
        return parse_model_json(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"--mm-model {path}: {err}") from None


def parse_model_json(raw: dict[str, Any]) -> ModelSpec:
    image = raw.get("image_encoder") or {}
    vit = image.get("vision_encoder") or {}
    projector = image.get("vision_projector") or {}
    audio = (raw.get("audio_encoder") or {}).get("audio_encoder") or {}
    text = raw.get("text_decoder")
    if not text:
        raise KeyError("text_decoder is missing")
    defaults_v, defaults_a, defaults_t = VisionConfig(), AudioConfig(), TextConfig()
    vision = VisionConfig(
        depth=_get(vit, "num_layers", default=defaults_v.depth),
        hidden_size=_get(vit, "hidden_size", default=defaults_v.hidden_size),
        intermediate_size=_get(vit, "intermediate_size", "ffn_hidden_size", default=defaults_v.intermediate_size),
        num_heads=_get(vit, "num_attention_heads", default=defaults_v.num_heads),
        in_channels=_get(vit, "in_channels", default=defaults_v.in_channels),
        patch_size=_get(vit, "patch_size", default=defaults_v.patch_size),
        spatial_merge_size=_get(vit, "spatial_merge_size", default=defaults_v.spatial_merge_size),
        temporal_patch_size=_get(vit, "temporal_patch_size", default=defaults_v.temporal_patch_size),
        window_size=_get(vit, "window_attn_size", "window_size", default=defaults_v.window_size),
        out_hidden_size=_get(
            projector, "hidden_size", default=_get(vit, "llm_hidden_size", default=text["hidden_size"])
        ),
        fullatt_block_indexes=list(_get(vit, "fullatt_block_indexes", default=defaults_v.fullatt_block_indexes)),
    )
    audio_cfg = AudioConfig(
        num_mel_bins=_get(audio, "num_mel_bins", default=defaults_a.num_mel_bins),
        encoder_layers=_get(audio, "num_layers", default=defaults_a.encoder_layers),
        encoder_attention_heads=_get(audio, "num_attention_heads", default=defaults_a.encoder_attention_heads),
        encoder_ffn_dim=_get(audio, "ffn_hidden_size", default=defaults_a.encoder_ffn_dim),
        d_model=_get(audio, "d_model", "hidden_size", default=defaults_a.d_model),
        max_source_positions=_get(audio, "max_source_positions", default=defaults_a.max_source_positions),
        n_window=_get(audio, "n_window", default=defaults_a.n_window),
        output_dim=_get(audio, "output_dim", default=text["hidden_size"]),
    )
    text_cfg = TextConfig(
        vocab_size=_get(text, "vocab_size", default=defaults_t.vocab_size),
        hidden_size=text["hidden_size"],
        intermediate_size=_get(text, "ffn_hidden_size", "intermediate_size", default=defaults_t.intermediate_size),
        num_hidden_layers=text["num_layers"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=_get(text, "num_query_groups", default=text["num_attention_heads"]),
        rms_norm_eps=_get(text, "layernorm_epsilon", default=defaults_t.rms_norm_eps),
        rope_theta=_get(text, "rope_theta", default=defaults_t.rope_theta),
        mrope_section=list(_get(text, "mrope_section", default=defaults_t.mrope_section)),
    )
    defaults = ThinkerConfig()
    thinker = ThinkerConfig(
        text=text_cfg,
        vision=vision,
        audio=audio_cfg,
        image_token_id=_get(raw, "image_token_id", default=defaults.image_token_id),
        video_token_id=_get(raw, "video_token_id", default=defaults.video_token_id),
        audio_token_id=_get(raw, "audio_token_id", default=defaults.audio_token_id),
        vision_start_token_id=_get(raw, "vision_start_token_id", default=defaults.vision_start_token_id),
        audio_start_token_id=_get(raw, "audio_start_token_id", default=defaults.audio_start_token_id),
    )
    sections = {"vision_encoder": vit, "vision_projector": projector, "audio_encoder": audio, "text_decoder": text}
    # The reference's defaults when a module has no freeze key: encoders frozen, projector and LLM trainable.
    default_freeze = {"vision_encoder": True, "vision_projector": False, "audio_encoder": True, "text_decoder": False}
    freeze = {m: bool(sections[m].get("freeze", default_freeze[m])) for m in MODULES}
    if "freeze_text_decoder" in raw:
        freeze["text_decoder"] = bool(raw["freeze_text_decoder"])
    pipeline = {m: sections[m].get("pipeline_num_layers") for m in MODULES}
    recompute = {
        m: {k: v for k, v in sections[m].items() if k.startswith("recompute_")}
        for m in MODULES
        if any(k.startswith("recompute_") for k in sections[m])
    }
    return ModelSpec(
        thinker=thinker,
        freeze=freeze,
        pipeline_num_layers=pipeline,
        img_context_token_id=raw.get("img_context_token_id"),
        recompute=recompute,
        raw=raw,
    )


def model_json_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """The model.json (MindSpeed-MM keys, plus omni_fast's token-id keys) that ``parse_model_json`` reads back as
    ``spec``: written beside checkpoints so that ``--load`` of a checkpoint needs no separate model.json."""
    t, v, a = spec.thinker.text, spec.thinker.vision, spec.thinker.audio
    layers = spec.pipeline_num_layers
    return {
        "img_context_token_id": spec.img_context_token_id,
        "image_token_id": spec.thinker.image_token_id,
        "video_token_id": spec.thinker.video_token_id,
        "audio_token_id": spec.thinker.audio_token_id,
        "vision_start_token_id": spec.thinker.vision_start_token_id,
        "audio_start_token_id": spec.thinker.audio_start_token_id,
        "image_encoder": {
            "vision_encoder": {
                "num_layers": v.depth, "hidden_size": v.hidden_size, "ffn_hidden_size": v.intermediate_size,
                "num_attention_heads": v.num_heads, "in_channels": v.in_channels, "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
                "window_attn_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "llm_hidden_size": v.out_hidden_size, "freeze": spec.freeze["vision_encoder"],
                "pipeline_num_layers": layers.get("vision_encoder"),
            },
            "vision_projector": {"hidden_size": v.out_hidden_size, "freeze": spec.freeze["vision_projector"]},
        },
        "audio_encoder": {
            "audio_encoder": {
                "num_layers": a.encoder_layers, "d_model": a.d_model, "ffn_hidden_size": a.encoder_ffn_dim,
                "num_attention_heads": a.encoder_attention_heads, "num_mel_bins": a.num_mel_bins,
                "max_source_positions": a.max_source_positions, "n_window": a.n_window, "output_dim": a.output_dim,
                "freeze": spec.freeze["audio_encoder"], "pipeline_num_layers": layers.get("audio_encoder"),
            }
        },
        "text_decoder": {
            "num_layers": t.num_hidden_layers, "hidden_size": t.hidden_size, "ffn_hidden_size": t.intermediate_size,
            "num_attention_heads": t.num_attention_heads, "num_query_groups": t.num_key_value_heads,
            "vocab_size": t.vocab_size, "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section),
            "layernorm_epsilon": t.rms_norm_eps, "freeze": spec.freeze["text_decoder"],
            "pipeline_num_layers": layers.get("text_decoder"),
        },
    }
