"""Builders of valid Qwen2.5-Omni token sequences, placeholders expanded the way the processor does it.

Mirrors ``Qwen2_5OmniProcessor.replace_multimodal_special_tokens`` (transformers 4.53) on tiny token ids:

* image  ``<vision_bos> <IMAGE>*(t*h*w/4) <vision_eos>``, video likewise with ``<VIDEO>``;
* audio  ``<audio_bos> <AUDIO>*n <audio_eos>``, n = ((L-1)//2+1-2)//2+1 for L mel frames;
* audio-in-video ``<vision_bos><audio_bos>`` + video chunk 0, audio chunk 0, video chunk 1, ... +
  ``<audio_eos><vision_eos>``, chunked like the processor does (float64 t values, no truncation).

A row is a list of items::

    ("text", n)                          n random ordinary ids (< 1000, no special token)
    ("image", (t, h, w))                 grid in patches, h and w even
    ("video", (t, h, w), second_per_grid)
    ("audio", mel_frames)
    ("av", (t, h, w), second_per_grid, mel_frames)   video with its audio interleaved (use_audio_in_video)

Grids, seconds and audio lengths come out flat over the batch in order of appearance, like the processor's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tiny_omni import TINY_IDS

MERGE_SIZE = 2


def audio_token_count(mel_frames: int) -> int:
    """Processor / model formula: conv stride 2 then 2x pooling."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def processor_chunk_bounds(token_indices: np.ndarray, tokens_per_chunk: int) -> list[tuple[int, int]]:
    """Literal port of the processor's ``get_chunked_index`` loop (kept loop-shaped on purpose: independent of
    the vectorised chunking under test)."""
    bounds = []
    start, current_chunk = 0, 1
    for i, value in enumerate(token_indices):
        if value >= current_chunk * tokens_per_chunk:
            bounds.append((start, i))
            start = i
            current_chunk += 1
    bounds.append((start, len(token_indices)))
    return bounds


def _check_grid(thw: tuple[int, int, int], merge_size: int = MERGE_SIZE) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in thw)
    if t < 1 or h < merge_size or w < merge_size or h % merge_size or w % merge_size:
        raise ValueError(f"grid {thw}: need t >= 1 and h, w positive multiples of the merge size {merge_size}")
    return t, h, w


def vision_tokens(thw: tuple[int, int, int], placeholder: int, ids: dict = TINY_IDS) -> list[int]:
    """``<vision_bos> placeholder*(t*h*w/4) <vision_eos>``."""
    t, h, w = _check_grid(thw)
    return [ids["vision_bos"]] + [placeholder] * (t * h * w // MERGE_SIZE**2) + [ids["vision_eos"]]


def audio_tokens(mel_frames: int, ids: dict = TINY_IDS) -> list[int]:
    """``<audio_bos> <AUDIO>*n <audio_eos>``."""
    return [ids["audio_bos"]] + [ids["audio"]] * audio_token_count(mel_frames) + [ids["audio_eos"]]


def av_tokens(
    thw: tuple[int, int, int],
    second_per_grid: float,
    mel_frames: int,
    ids: dict = TINY_IDS,
    position_id_per_seconds: int = 25,
    seconds_per_chunk: float = 2.0,
    merge_size: int = MERGE_SIZE,
) -> list[int]:
    """An audio-in-video block, as the processor writes it with ``use_audio_in_video=True``."""
    t, h, w = _check_grid(thw, merge_size)
    audio_idx = np.arange(audio_token_count(mel_frames))
    per_t = (h // merge_size) * (w // merge_size)
    # processor: int t index * python float * rate, in float64 (the model truncates float32 values instead)
    video_idx = np.repeat(np.arange(t), per_t) * second_per_grid * position_id_per_seconds
    tokens_per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    video_chunks = processor_chunk_bounds(video_idx, tokens_per_chunk)
    audio_chunks = processor_chunk_bounds(audio_idx, tokens_per_chunk)
    out = [ids["vision_bos"], ids["audio_bos"]]
    for j in range(max(len(video_chunks), len(audio_chunks))):
        if j < len(video_chunks):
            out += [ids["video"]] * (video_chunks[j][1] - video_chunks[j][0])
        if j < len(audio_chunks):
            out += [ids["audio"]] * (audio_chunks[j][1] - audio_chunks[j][0])
    return out + [ids["audio_eos"], ids["vision_eos"]]


@dataclass
class Batch:
    """A padded batch plus the flat media lists the model needs; a list is None when the batch has none."""

    input_ids: np.ndarray  # (B, L) int64
    attention_mask: np.ndarray  # (B, L) int64
    image_grid_thw: np.ndarray | None  # (n_images, 3) int64
    video_grid_thw: np.ndarray | None  # (n_videos, 3) int64
    second_per_grids: np.ndarray | None  # (n_videos,) float64
    audio_seqlens: np.ndarray | None  # (n_audios,) int64 mel frames
    use_audio_in_video: bool
    lengths: list[int]  # unpadded row lengths


def build_row(
    items: list[tuple],
    rng: np.random.Generator,
    ids: dict = TINY_IDS,
    position_id_per_seconds: int = 25,
    seconds_per_chunk: float = 2.0,
) -> tuple[list[int], list, list, list, list]:
    """Tokens of one row and its (images, videos, seconds, audio mel lengths) in order of appearance."""
    tokens: list[int] = []
    images, videos, seconds, audios = [], [], [], []
    for item in items:
        kind = item[0]
        if kind == "text":
            tokens += rng.integers(0, 1000, size=int(item[1])).tolist()
        elif kind == "image":
            tokens += vision_tokens(item[1], ids["image"], ids)
            images.append(_check_grid(item[1]))
        elif kind == "video":
            tokens += vision_tokens(item[1], ids["video"], ids)
            videos.append(_check_grid(item[1]))
            seconds.append(float(item[2]))
        elif kind == "audio":
            tokens += audio_tokens(int(item[1]), ids)
            audios.append(int(item[1]))
        elif kind == "av":
            tokens += av_tokens(item[1], item[2], int(item[3]), ids, position_id_per_seconds, seconds_per_chunk)
            videos.append(_check_grid(item[1]))
            seconds.append(float(item[2]))
            audios.append(int(item[3]))
        else:
            raise ValueError(f"unknown item kind {kind!r}")
    return tokens, images, videos, seconds, audios


def build_batch(
    rows: list[list[tuple]],
    padding_side: str = "right",
    seed: int = 0,
    ids: dict = TINY_IDS,
    position_id_per_seconds: int = 25,
    seconds_per_chunk: float = 2.0,
    extra_pad: int = 0,
) -> Batch:
    """Pad the rows to one length (+ ``extra_pad``) with ``ids["pad"]`` on ``padding_side``, mask 0 on pads."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    kinds = {item[0] for row in rows for item in row}
    if "video" in kinds and "av" in kinds:
        # the processor's use_audio_in_video flag applies to every video of the call
        raise ValueError("a batch cannot mix plain videos and audio-in-video blocks")
    rng = np.random.default_rng(seed)
    built = [build_row(row, rng, ids, position_id_per_seconds, seconds_per_chunk) for row in rows]
    lengths = [len(b[0]) for b in built]
    width = max(lengths, default=0) + extra_pad
    input_ids = np.full((len(rows), width), ids["pad"], dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, (tokens, *_rest) in enumerate(built):
        sl = slice(width - len(tokens), width) if padding_side == "left" else slice(0, len(tokens))
        input_ids[r, sl] = tokens
        mask[r, sl] = 1
    images = [g for b in built for g in b[1]]
    videos = [g for b in built for g in b[2]]
    seconds = [s for b in built for s in b[3]]
    audios = [a for b in built for a in b[4]]
    return Batch(
        input_ids=input_ids,
        attention_mask=mask,
        image_grid_thw=np.array(images, dtype=np.int64).reshape(-1, 3) if images else None,
        video_grid_thw=np.array(videos, dtype=np.int64).reshape(-1, 3) if videos else None,
        second_per_grids=np.array(seconds, dtype=np.float64) if videos else None,
        audio_seqlens=np.array(audios, dtype=np.int64) if audios else None,
        use_audio_in_video="av" in kinds,
        lengths=lengths,
    )
