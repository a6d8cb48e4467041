"""Batches of encoded samples -> the thinker's keyword inputs (``Qwen2_5OmniThinker.prepare_batch(**batch)``).

Like the reference collator (MindSpeed-MM ``MultiModalDataCollatorForSeq2Seq`` / ``DataCollatorForSeq2Seq``): token
arrays are padded on the **right** to a multiple of 8 (``input_ids`` with the pad id, ``attention_mask`` with 0,
``labels`` with -100, or with the pad id when ``ignore_pad_token_for_loss`` is false), and the media of all rows are
concatenated in row order (``pixel_values``/``image_grid_thw``, ``pixel_values_videos``/``video_grid_thw``/
``video_second_per_grid``, ``input_features``/``feature_attention_mask`` — the features padded with zero frames to
the longest audio of the batch, which the masked audio tower ignores).

Beyond the reference:

* ``position_ids`` [3, B, L] come from :func:`omni_fast.ops.get_rope_index` (as LLaMA-Factory's collator does), one
  row at a time with that row's own ``use_audio_in_video``, so rows with and without audio-in-video blocks can share
  a batch (transformers applies one flag to a whole batch). ``use_audio_in_video`` in the output is true if any
  row uses it.
* No fake image / audio is injected into text-only batches: the model skips an absent tower instead.
* ``sample_ids`` lists each row's ``file#index`` (the trainer logs it with a non-finite loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from omni_fast.data.processor import POSITION_ID_PER_SECONDS, SECONDS_PER_CHUNK
from omni_fast.data.template import IGNORE_INDEX, EncodedSample
from omni_fast.ops import get_rope_index

__all__ = ["OmniCollator"]


class OmniCollator:
    """``collator(samples) -> dict`` of numpy arrays named as ``Qwen2_5OmniThinker.prepare_batch`` takes them."""

    def __init__(
        self,
        pad_token_id: int,
        *,
        image_token_id: int,
        video_token_id: int,
        audio_token_id: int,
        vision_start_token_id: int,
        audio_start_token_id: int,
        spatial_merge_size: int = 2,
        position_id_per_seconds: int = POSITION_ID_PER_SECONDS,
        seconds_per_chunk: float = SECONDS_PER_CHUNK,
        pad_to_multiple_of: int = 8,
        label_pad_id: int = IGNORE_INDEX,
    ):
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.label_pad_id = int(label_pad_id)
        self.rope_kwargs = {
            "spatial_merge_size": int(spatial_merge_size),
            "image_token_id": int(image_token_id),
            "video_token_id": int(video_token_id),
            "audio_token_id": int(audio_token_id),
            "vision_start_token_id": int(vision_start_token_id),
            "audio_start_token_id": int(audio_start_token_id),
            "position_id_per_seconds": position_id_per_seconds,
            "seconds_per_chunk": seconds_per_chunk,
        }

    @classmethod
    def from_processor(cls, processor: Any, *, label_pad_ignored: bool = True, **kwargs: Any) -> OmniCollator:
        """Token ids from an :class:`~omni_fast.data.OmniProcessor` (its tokenizer's pad token and media tokens);
        ``label_pad_ignored`` is data.json's ``collate_param.ignore_pad_token_for_loss``."""
        ids = processor.ids
        pad = processor.tokenizer.pad_token_id
        if pad is None:
            raise ValueError(f"{processor.source}: the tokenizer has no pad token")
        return cls(
            pad,
            image_token_id=ids["image"],
            video_token_id=ids["video"],
            audio_token_id=ids["audio"],
            vision_start_token_id=ids["vision_bos"],
            audio_start_token_id=ids["audio_bos"],
            spatial_merge_size=processor.merge_size,
            label_pad_id=IGNORE_INDEX if label_pad_ignored else pad,
            **kwargs,
        )

    def _positions(self, input_ids: np.ndarray, attention_mask: np.ndarray, samples: Sequence[EncodedSample]):
        """[3, B, L] rope positions, each row with its own media and its own use_audio_in_video."""
        out = np.empty((3, *input_ids.shape), np.int64)
        for b, s in enumerate(samples):
            seqlens = None if s.feature_attention_mask is None else s.feature_attention_mask.sum(-1).astype(np.int64)
            out[:, b : b + 1], _ = get_rope_index(
                input_ids[b : b + 1],
                s.image_grid_thw,
                s.video_grid_thw,
                attention_mask[b : b + 1],
                use_audio_in_video=bool(s.use_audio_in_video),
                audio_seqlens=seqlens,
                second_per_grids=s.video_second_per_grid,
                **self.rope_kwargs,
            )
        return out

    def __call__(self, samples: Sequence[EncodedSample]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        lengths = [int(s.input_ids.shape[0]) for s in samples]
        m = self.pad_to_multiple_of
        width = -(-max(lengths) // m) * m
        batch = len(samples)
        input_ids = np.full((batch, width), self.pad_token_id, np.int64)
        attention_mask = np.zeros((batch, width), np.int64)
        labels = np.full((batch, width), self.label_pad_id, np.int64)
        for b, (s, n) in enumerate(zip(samples, lengths)):
            if s.labels.shape != s.input_ids.shape:
                raise ValueError(f"sample {b}: labels shape {s.labels.shape} != input_ids shape {s.input_ids.shape}")
            input_ids[b, :n] = s.input_ids
            attention_mask[b, :n] = s.attention_mask
            labels[b, :n] = s.labels
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "position_ids": self._positions(input_ids, attention_mask, samples),
        }

        def concat(name: str, dtype) -> np.ndarray | None:
            parts = [getattr(s, name) for s in samples if getattr(s, name) is not None]
            return np.concatenate(parts).astype(dtype, copy=False) if parts else None

        media = {
            "pixel_values": concat("pixel_values", np.float32),
            "image_grid_thw": concat("image_grid_thw", np.int64),
            "pixel_values_videos": concat("pixel_values_videos", np.float32),
            "video_grid_thw": concat("video_grid_thw", np.int64),
            "video_second_per_grid": concat("video_second_per_grid", np.float64),
        }
        audios = [s for s in samples if s.input_features is not None]
        if audios:
            frames = max(s.input_features.shape[-1] for s in audios)
            n_mels = audios[0].input_features.shape[1]
            total = sum(s.input_features.shape[0] for s in audios)
            features = np.zeros((total, n_mels, frames), np.float32)
            mask = np.zeros((total, frames), np.int32)
            i = 0
            for s in audios:
                n, _, f = s.input_features.shape
                features[i : i + n, :, :f] = s.input_features
                mask[i : i + n, :f] = s.feature_attention_mask
                i += n
            media["input_features"], media["feature_attention_mask"] = features, mask
        out.update({k: v for k, v in media.items() if v is not None})
        out["use_audio_in_video"] = any(bool(s.use_audio_in_video) for s in samples)
        out["sample_ids"] = [getattr(s, "sample_id", "") for s in samples]
        return out
