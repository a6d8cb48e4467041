"""Media decoding: images with PIL, video frames and audio with PyAV. No torch, no librosa.

The rules follow the reference data pipeline (MindSpeed-MM ``mindspeed_mm/data/data_utils/func_utils/mm_plugin.py``,
the LLaMA-Factory ``Qwen2OmniPlugin`` it copies):

* Video frames: the indices ``np.linspace(0, total - 1, n).astype(int32)`` with
  ``n = min(total, video_maxlen, max(1, floor(duration * video_fps)))`` over the decoded frame order
  (``_get_video_sample_indices``); a stream that does not know its frame count gives the first ``video_maxlen``
  frames. The clip's rate, used for ``video_second_per_grid = temporal_patch_size / fps``, is
  ``len(indices) / duration`` (``fps_per_video``). Where the stream has no duration the container's is used (the
  reference crashes there).
* Audio: any container's first audio stream (an audio file, or a video's sound track), resampled with PyAV's
  resampler to the requested rate and averaged over channels to mono float32. The reference loads with
  ``librosa.load(sr=16000)``, which also averages channels but resamples with soxr: samples differ slightly, not
  the length (``round(n * 16000 / rate)`` either way, up to the resampler's rounding of the last sample).

Every failure is a :class:`MediaError` (a ``ValueError``) whose message starts with the file path.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["MediaError", "VideoClip", "load_audio", "load_image", "load_video", "sample_video_indices"]

logger = logging.getLogger("omni_fast.data")


class MediaError(ValueError):
    """A media file is missing, undecodable or lacks what was asked of it; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(path, "file not found")
    if not os.path.isfile(path):
        raise MediaError(path, "not a regular file")


def load_image(path: str) -> Image.Image:
    """The decoded image in the mode it is stored in (conversion to RGB comes after the reference's pre-resize)."""
    _check_exists(path)
    try:
        with Image.open(path) as img:
            img.load()
            # copy() detaches the pixels from the file handle closed by the with-block.
            return img.copy()
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        raise MediaError(path, f"cannot decode image ({exc})") from exc


@dataclass
class VideoClip:
    """Frames sampled from a video (RGB, decoded size) and the rate they stand for."""

    path: str
    frames: list[Image.Image]
    indices: np.ndarray  # sampled positions in decode order
    duration: float  # seconds
    fps: float  # len(indices) / duration: what video_second_per_grid is computed from


def sample_video_indices(total_frames: int, duration: float, video_fps: float, video_maxlen: int) -> np.ndarray:
    """The reference's ``_get_video_sample_indices``: evenly spaced frame indices at ``video_fps`` up to
    ``video_maxlen``; ``total_frames == 0`` (unknown count) means the first ``video_maxlen`` frames."""
    if total_frames == 0:
        return np.linspace(0, video_maxlen - 1, video_maxlen).astype(np.int32)
    sample_frames = max(1, math.floor(duration * video_fps))
    sample_frames = min(total_frames, video_maxlen, sample_frames)
    return np.linspace(0, total_frames - 1, sample_frames).astype(np.int32)


def _open(path: str):
    import av

    _check_exists(path)
    try:
        return av.open(path, "r")
    except av.FFmpegError as exc:
        raise MediaError(path, f"cannot open media container ({exc})") from exc


def load_video(path: str, *, video_fps: float, video_maxlen: int) -> VideoClip:
    """Decode the frames of the first video stream that the sampling rule picks."""
    import av

    with _open(path) as container:
        streams = container.streams.video
        if not streams:
            raise MediaError(path, "no video stream")
        stream = streams[0]
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            raise MediaError(path, "neither the video stream nor the container tells the duration")
        if duration <= 0:
            raise MediaError(path, f"video duration is {duration} s")
        indices = sample_video_indices(stream.frames, duration, video_fps, video_maxlen)
        wanted = set(indices.tolist())
        last = int(indices.max())
        frames: list[Image.Image] = []
        try:
            container.seek(0)
            for idx, frame in enumerate(container.decode(stream)):
                if idx in wanted:
                    frames.append(frame.to_image())
                if idx >= last:
                    break
        except av.FFmpegError as exc:
            raise MediaError(path, f"cannot decode video frames ({exc})") from exc
    if not frames:
        raise MediaError(path, "no video frame could be decoded")
    if len(frames) < len(wanted):
        # The reference goes on with the frames it got (and the rate of the planned ones); so do we, loudly.
        logger.warning(
            "%s: the stream announces %d frames but only %d of the %d sampled ones were decoded",
            path, stream.frames, len(frames), len(wanted),
        )
    return VideoClip(path=path, frames=frames, indices=indices, duration=duration, fps=len(indices) / duration)


def load_audio(path: str, sampling_rate: int = 16000) -> np.ndarray:
    """The first audio stream of ``path`` (an audio file or a video's sound track) as mono float32 at
    ``sampling_rate``."""
    import av

    with _open(path) as container:
        streams = container.streams.audio
        if not streams:
            raise MediaError(path, "no audio stream (a video used with use_audio_in_video needs a sound track)")
        stream = streams[0]
        # Keep the source channel layout through the resampler, then average channels like librosa's to_mono.
        resampler = av.AudioResampler(format="fltp", layout=None, rate=sampling_rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray() for f in resampler.resample(None))
        except av.FFmpegError as exc:
            raise MediaError(path, f"cannot decode audio ({exc})") from exc
    if not chunks:
        raise MediaError(path, "the audio stream has no samples")
    samples = np.concatenate(chunks, axis=1)  # (channels, n)
    return samples.mean(axis=0, dtype=np.float32) if samples.shape[0] > 1 else samples[0].astype(np.float32)
