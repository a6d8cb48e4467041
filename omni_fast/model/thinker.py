"""The Qwen2.5-Omni Thinker: audio tower + vision tower + text decoder + LM head, and its causal-LM loss.

Two layers of interface:

* ``model(input_ids=..., attention_mask=..., pixel_values=..., ...)`` takes transformers' keyword names (numpy
  arrays or MindSpore tensors) and returns ``ThinkerOutput(logits, loss)``. It plans the batch on the host
  (rope index, vision windows, audio chunks, placeholder checks) with :func:`prepare_batch`, then calls
* ``model.compute(*batch.arguments())``: pure tensor ops with the plan as inputs, compilable under ``ms.jit``.
  The trainer calls this directly with batches its data loader prepared.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from omni_fast.config.model_config import ThinkerConfig
from omni_fast.model.audio import AudioEncoder, audio_output_lengths, prepare_audio_inputs
from omni_fast.model.layers import LayerNorm, Linear, RMSNorm
from omni_fast.model.loading import load_state_into
from omni_fast.model.text import TextModel
from omni_fast.model.vision import VisionEncoder, prepare_vision_inputs
from omni_fast.ops import dispatch
from omni_fast.ops.rope_index import get_rope_index
from omni_fast.ops.scatter import check_placeholder_counts, multimodal_scatter

IGNORE_INDEX = -100
DTYPES = {"float32": ms.float32, "bfloat16": ms.bfloat16}


class ThinkerOutput(NamedTuple):
    logits: Tensor  # [B, S, V] in the compute dtype
    loss: Tensor | None  # float32 scalar: mean over label tokens != -100 (shifted by one)


@dataclass
class PreparedBatch:
    """Everything ``Qwen2_5OmniThinker.compute`` needs, as numpy arrays (None where a modality is absent)."""

    input_ids: np.ndarray  # [B, S] int32
    attention_mask: np.ndarray  # [B, S] int32
    position_ids: np.ndarray  # [3, B, S] int64
    labels: np.ndarray | None  # [B, S] int32
    image: tuple[np.ndarray, ...] | None  # (pixel_values, *vision plan)
    video: tuple[np.ndarray, ...] | None  # (pixel_values_videos, *vision plan)
    audio: tuple[np.ndarray, ...] | None  # (input_features, *audio plan)

    def arguments(self) -> tuple[Any, ...]:
        """Positional arguments for ``compute``, as tensors."""

        def tensor(value):
            if value is None:
                return None
            if isinstance(value, tuple):
                # mutable: under ms.jit a plain tuple of tensors is a constant, and new values would recompile.
                return ms.mutable(tuple(Tensor(v) for v in value))
            return Tensor(value)

        return tuple(tensor(getattr(self, f.name)) for f in fields(self))


def causal_lm_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross entropy of logits[:, :-1] against labels[:, 1:] in float32, ignoring -100.

    Without ``weights``: the mean over valid tokens (transformers' loss). With ``weights`` [B, S-1] (zero where the
    shifted label is ignored): ``sum(nll * weights)`` — the trainer's loss modes are all such weightings.
    """
    logits = logits[:, :-1].astype(ms.float32)
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    safe_target = ops.where(valid, target, ops.zeros_like(target))
    log_probs = ops.log_softmax(logits, -1)
    picked = ops.gather_elements(log_probs, 2, safe_target.reshape(*safe_target.shape, 1).astype(ms.int64))
    nll = -picked.reshape(target.shape)
    valid_f = valid.astype(ms.float32)
    if weights is not None:
        return (nll * valid_f * weights).sum()
    return (nll * valid_f).sum() / ops.maximum(valid_f.sum(), 1.0)


def _to_numpy(value: Any, dtype: Any | None = None) -> np.ndarray | None:
    if value is None:
        return None
    array = value.asnumpy() if isinstance(value, Tensor) else np.asarray(value)
    return array.astype(dtype) if dtype is not None else array


def _check_contiguous_rows(mask: np.ndarray) -> None:
    """The text attention runs each row as (padding, tokens, padding) segments: a row's tokens must be one run."""
    valid = mask > 0
    starts = valid & ~np.pad(valid, ((0, 0), (1, 0)))[:, :-1]  # a token whose left neighbour is padding
    runs = starts.sum(1)
    if (runs > 1).any():
        row = int(np.argmax(runs > 1))
        where = np.flatnonzero(starts[row]).tolist()
        raise ValueError(
            f"attention_mask row {row} has {int(runs[row])} separate runs of tokens (starting at positions {where}): "
            "each row's tokens must be contiguous (left, right or no padding), as omni_fast's collator pads them"
        )


class Qwen2_5OmniThinker(nn.Cell):
    """``Qwen2_5OmniThinkerForConditionalGeneration`` for training: parameter names match its state dict."""

    def __init__(self, config: ThinkerConfig, dtype: str = "float32"):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        hidden = config.text.hidden_size
        if config.audio.output_dim != hidden or config.vision.out_hidden_size != hidden:
            raise ValueError(
                f"encoder output sizes (audio {config.audio.output_dim}, vision {config.vision.out_hidden_size}) "
                f"must equal the text hidden size {hidden}"
            )
        self.config = config
        param_dtype = DTYPES[dtype]
        self.compute_dtype = dispatch.compute_dtype(param_dtype)
        cd = self.compute_dtype
        self.audio_tower = AudioEncoder(config.audio, param_dtype, cd)
        self.visual = VisionEncoder(config.vision, param_dtype, cd)
        self.model = TextModel(config.text, param_dtype, cd)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, False, param_dtype, cd)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32") -> Qwen2_5OmniThinker:
        """Build from a local Hugging Face Qwen2.5-Omni (or thinker-only) directory."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a model directory")
        model = cls(ThinkerConfig.from_file(path / "config.json"), dtype=dtype)
        load_state_into(model, path)
        return model

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Fresh weights (training from scratch, tests): normal(0, std) matrices, unit norm scales, zero biases."""
        rng = np.random.default_rng(seed)
        norm_scales = {id(c.weight) for _, c in self.cells_and_names() if isinstance(c, (RMSNorm, LayerNorm))}
        for _, param in self.parameters_and_names():
            if id(param) in norm_scales:
                value = np.ones(param.shape, np.float32)
            elif param.ndim == 1:
                value = np.zeros(param.shape, np.float32)
            else:
                value = rng.normal(0.0, std, param.shape).astype(np.float32)
            param.set_data(Tensor(value).astype(param.dtype))

    # ------------------------------------------------------------------ host-side planning

    def prepare_batch(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        pixel_values_videos: Any = None,
        video_grid_thw: Any = None,
        video_second_per_grid: Any = None,
        input_features: Any = None,
        feature_attention_mask: Any = None,
        use_audio_in_video: bool = False,
        labels: Any = None,
        position_ids: Any = None,
    ) -> PreparedBatch:
        """Check the inputs against each other and compute the host-side plan (numpy)."""
        cfg = self.config
        ids = _to_numpy(input_ids)
        if ids is None or ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {None if ids is None else ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else _to_numpy(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        _check_contiguous_rows(mask)

        image = video = audio = None
        image_grid = _to_numpy(image_grid_thw, np.int64)
        video_grid = _to_numpy(video_grid_thw, np.int64)
        audio_lengths = image_rows = video_rows = audio_rows = None
        if pixel_values is not None:
            if image_grid is None:
                raise ValueError("pixel_values given without image_grid_thw")
            image_rows = int((image_grid.prod(-1) // cfg.vision.spatial_merge_size**2).sum())
            image = (_to_numpy(pixel_values, np.float32), *prepare_vision_inputs(image_grid, cfg.vision))
        if pixel_values_videos is not None:
            if video_grid is None:
                raise ValueError("pixel_values_videos given without video_grid_thw")
            if video_second_per_grid is None:
                raise ValueError("pixel_values_videos given without video_second_per_grid")
            video_rows = int((video_grid.prod(-1) // cfg.vision.spatial_merge_size**2).sum())
            video = (_to_numpy(pixel_values_videos, np.float32), *prepare_vision_inputs(video_grid, cfg.vision))
        if input_features is not None:
            if feature_attention_mask is None:
                raise ValueError("input_features given without feature_attention_mask")
            audio_lengths = _to_numpy(feature_attention_mask).sum(-1).astype(np.int64)
            audio_rows = int(audio_output_lengths(audio_lengths).sum())
            audio = (_to_numpy(input_features, np.float32), *prepare_audio_inputs(audio_lengths, cfg.audio))
        check_placeholder_counts(
            ids,
            image_rows=image_rows,
            video_rows=video_rows,
            audio_rows=audio_rows,
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            audio_token_id=cfg.audio_token_id,
        )

        second_per_grid = _to_numpy(video_second_per_grid, np.float64)
        position_ids = _to_numpy(position_ids, np.int64)
        if position_ids is None:  # else given by the data collator (per row: rows may differ in use_audio_in_video)
            position_ids, _ = get_rope_index(
                ids,
                image_grid,
                video_grid,
                mask,
                use_audio_in_video=bool(use_audio_in_video),
                audio_seqlens=audio_lengths,
                second_per_grids=second_per_grid,
                spatial_merge_size=cfg.vision.spatial_merge_size,
                image_token_id=cfg.image_token_id,
                video_token_id=cfg.video_token_id,
                audio_token_id=cfg.audio_token_id,
                vision_start_token_id=cfg.vision_start_token_id,
                audio_start_token_id=cfg.audio_start_token_id,
                position_id_per_seconds=cfg.position_id_per_seconds,
                seconds_per_chunk=cfg.seconds_per_chunk,
            )
        elif position_ids.shape != (3, *ids.shape):
            raise ValueError(f"position_ids shape {position_ids.shape} != (3, *input_ids.shape) = {(3, *ids.shape)}")
        label_array = _to_numpy(labels, np.int32)
        if label_array is not None and label_array.shape != ids.shape:
            raise ValueError(f"labels shape {label_array.shape} differs from input_ids shape {ids.shape}")
        return PreparedBatch(
            input_ids=ids.astype(np.int32),
            attention_mask=mask.astype(np.int32),
            position_ids=position_ids.astype(np.int64),
            labels=label_array,
            image=image,
            video=video,
            audio=audio,
        )

    # ------------------------------------------------------------------ device-side compute

    def compute(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        labels: Tensor | None,
        image: tuple | None,
        video: tuple | None,
        audio: tuple | None,
        loss_weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (and the loss when labels are given; weighted per token with ``loss_weights``)."""
        cfg = self.config
        embeds = multimodal_scatter(
            self.model.embed(input_ids),
            input_ids,
            image_embeds=None if image is None else self.visual(*image),
            video_embeds=None if video is None else self.visual(*video),
            audio_embeds=None if audio is None else self.audio_tower(*audio),
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            audio_token_id=cfg.audio_token_id,
        )
        hidden = self.model(embeds, attention_mask, position_ids)
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels, loss_weights) if labels is not None else None
        return logits, loss

    def construct(self, input_ids: Any, attention_mask: Any = None, **inputs: Any) -> ThinkerOutput:
        batch = self.prepare_batch(input_ids, attention_mask, **inputs)
        return ThinkerOutput(*self.compute(*batch.arguments()))
