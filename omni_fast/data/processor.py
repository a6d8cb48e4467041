"""The Qwen2.5-Omni processor path in numpy: pixel patches, Whisper log-mel features, placeholder token runs.

:class:`OmniProcessor` is built from a Hugging Face model directory (``model_name_or_path`` in ``data.json``:
tokenizer files + ``preprocessor_config.json``) plus ``data.json``'s preprocessing settings. It reproduces what the
reference pipeline (MindSpeed-MM's copy of LLaMA-Factory's ``Qwen2OmniPlugin``, ``func_utils/mm_plugin.py``) hands
to transformers 4.53 and what transformers then computes:

* **Images**: the plugin's pre-resize (``image_min/max_pixels``, PIL's default filter, then RGB, short side >= 28,
  aspect ratio <= 200), then transformers' ``Qwen2VLImageProcessor`` itself (used directly: numpy + PIL).
* **Videos**: the plugin's frame pre-resize (``video_min/max_pixels``, nearest-neighbour), odd frame counts padded
  with the last frame, then the ``Qwen2VLVideoProcessor`` computation re-done in numpy, because that class needs
  torchvision: ``smart_resize`` to multiples of 28 within the configured min/max pixels, bicubic resize, fused
  ``(x - 255 mean) / (255 std)`` in float32, the same patch layout. The resize is done as two PIL passes, horizontal
  then vertical, the order torch's uint8 antialiased bicubic kernel (which torchvision calls) always uses; PIL alone
  picks the vertical pass first when it shrinks the height and enlarges the width, which differs by up to ~20 grey
  levels on noisy frames. What remains: torch computes its filter weights in int16 where PIL uses 22-bit fixed
  point, so a few resized pixels differ by one or two grey levels (demo videos: <= 2 levels, i.e. <= 0.03 after
  normalisation, on <= 0.27 % of the values); without a resize the patches are bit-identical.
  tests/test_processor.py measures both against a torch re-run of the video processor.
* **Audio**: mono float32 at 16 kHz, cut to the feature extractor's ``n_samples`` (hub: 300 s) with a warning that
  says how much was dropped, then ``WhisperFeatureExtractor``'s numpy log-mel (``_np_extract_fbank_features``,
  called directly so the result does not depend on whether torch is installed). Only the valid frames are kept
  (``ceil(samples / hop)``): they are bit-identical to the reference's, whose other frames are padding masked out.
* **Token runs**: ``<|vision_bos|> <|IMAGE|>*(t*h*w/4) <|vision_eos|>``, same with ``<|VIDEO|>``,
  ``<|audio_bos|> <|AUDIO|>*n <|audio_eos|>`` with ``n = ((F-1)//2+1-2)//2+1`` for ``F`` mel frames, and the
  audio-in-video block interleaving video and audio tokens in 2-second chunks exactly as
  ``Qwen2_5OmniProcessor.replace_multimodal_special_tokens`` (video t values ``k * second_per_grid * 25`` in
  float64, ``get_chunked_index``'s splitting).

Deliberate differences from the reference: ``video_second_per_grid`` is float64, the python floats the processor
expands tokens with (its torch tensor would be float32; the model rounds to float32 itself). The video size bounds
are the model directory's video processor settings (``video_preprocessor_config.json``, else
``preprocessor_config.json``), as in the reference pipeline, which calls the video processor directly —
``Qwen2_5OmniProcessor.__call__`` would force 100352..602112 pixels instead.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from omni_fast.data.media import MediaError, VideoClip

__all__ = ["AudioFeatures", "OmniProcessor", "VisionPatches"]

logger = logging.getLogger("omni_fast.data")

# Token strings of Qwen2.5-Omni (the reference template registers the same ones).
SPECIAL_TOKENS = {
    "image": "<|IMAGE|>",
    "video": "<|VIDEO|>",
    "audio": "<|AUDIO|>",
    "vision_bos": "<|vision_bos|>",
    "vision_eos": "<|vision_eos|>",
    "audio_bos": "<|audio_bos|>",
    "audio_eos": "<|audio_eos|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}
POSITION_ID_PER_SECONDS = 25  # Qwen2_5OmniProcessor defaults
SECONDS_PER_CHUNK = 2.0
MIN_SIDE = 28  # reference plugin: images are enlarged to at least 28 px per side
MAX_ASPECT = 200  # ... and an aspect ratio above 200 is squeezed to 180


@dataclass
class VisionPatches:
    """Flattened patches of one or more images (or videos) and their (t, h, w) grids in patches."""

    pixel_values: np.ndarray  # (sum t*h*w, channels * temporal_patch * patch * patch) float32
    grid_thw: np.ndarray  # (n, 3) int64


@dataclass
class AudioFeatures:
    """Log-mel features of one audio, valid frames only."""

    features: np.ndarray  # (n_mels, frames) float32
    dropped_seconds: float  # audio cut because it exceeded the feature extractor's n_samples


def _pil_resize(image: Image.Image, size: tuple[int, int], resample: Image.Resampling | None) -> Image.Image:
    # resample=None is PIL's default for the image mode (bicubic; nearest for "1" and "P"), as the reference calls it.
    return image.resize((max(1, size[0]), max(1, size[1])), resample=resample)


def regularize_image(image: Image.Image, max_pixels: int, min_pixels: int, nearest: bool) -> Image.Image:
    """The reference plugin's ``_preprocess_image`` chain (MMPluginMixin + Qwen2VLPlugin), in its order.

    ``nearest`` is the reference's ``resample=True`` (its video frames); images use PIL's default filter.
    """
    resample = Image.Resampling.NEAREST if nearest else None
    w, h = image.size
    if w * h > max_pixels:
        f = math.sqrt(max_pixels / (w * h))
        image = _pil_resize(image, (int(w * f), int(h * f)), resample)
    w, h = image.size
    if w * h < min_pixels:
        f = math.sqrt(min_pixels / (w * h))
        image = _pil_resize(image, (int(w * f), int(h * f)), resample)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if min(image.size) < MIN_SIDE:
        image = _pil_resize(image, (max(image.width, MIN_SIDE), max(image.height, MIN_SIDE)), None)
    if image.width / image.height > MAX_ASPECT:
        image = _pil_resize(image, (image.height * 180, image.height), None)
    if image.height / image.width > MAX_ASPECT:
        image = _pil_resize(image, (image.width, image.width * 180), None)
    return image


def audio_token_count(mel_frames: int) -> int:
    """LLM tokens for ``mel_frames`` mel frames (the processor's formula: conv stride 2, then 2x pooling)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def chunk_counts(values: np.ndarray, tokens_per_chunk: int) -> list[int]:
    """Tokens per chunk, a literal port of ``Qwen2_5OmniProcessor.get_chunked_index``: the chunk counter advances
    by at most one per token, so a jump over several chunks gives one-token chunks, as there.

    The model's rope index (``omni_fast.ops.rope_index``) applies the same rule to float32-truncated values; this
    copy keeps the data path free of MindSpore (preprocessing workers import no framework).
    """
    counts: list[int] = []
    start, current = 0, 1
    for i, value in enumerate(values.tolist()):
        if value >= current * tokens_per_chunk:
            counts.append(i - start)
            start, current = i, current + 1
    counts.append(len(values) - start)
    return counts


class OmniProcessor:
    """Tokenizer + image processor + feature extractor + the reference's preprocessing settings.

    Build it with :meth:`from_pretrained`. The keyword settings are ``data.json``'s ``preprocess_parameters``
    (defaults are the reference's ``ProcessorArguments``).
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        feature_extractor: Any,
        *,
        video_min_pixels_config: int | None = None,
        video_max_pixels_config: int | None = None,
        image_max_pixels: int = 768 * 768,
        image_min_pixels: int = 32 * 32,
        video_max_pixels: int = 256 * 256,
        video_min_pixels: int = 16 * 16,
        video_fps: float = 2.0,
        video_maxlen: int = 128,
        audio_sampling_rate: int = 16000,
        use_audio_in_video: bool = False,
        source: str = "<memory>",
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.feature_extractor = feature_extractor
        self.source = source
        ip = image_processor
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if not getattr(ip, flag, True):
                raise ValueError(f"{source}: image processor setting {flag}=false is not supported")
        if audio_sampling_rate != feature_extractor.sampling_rate:
            raise ValueError(
                f"audio_sampling_rate {audio_sampling_rate} differs from the feature extractor's sampling rate "
                f"{feature_extractor.sampling_rate} ({source}); the reference would fail on every audio"
            )
        if video_fps <= 0 or video_maxlen < 1:
            raise ValueError(f"video_fps must be > 0 and video_maxlen >= 1, got {video_fps}, {video_maxlen}")
        self.image_max_pixels = int(image_max_pixels)
        self.image_min_pixels = int(image_min_pixels)
        self.video_max_pixels = int(video_max_pixels)
        self.video_min_pixels = int(video_min_pixels)
        self.video_fps = float(video_fps)
        self.video_maxlen = int(video_maxlen)
        self.audio_sampling_rate = int(audio_sampling_rate)
        self.use_audio_in_video = bool(use_audio_in_video)
        self.patch_size = int(ip.patch_size)
        self.merge_size = int(ip.merge_size)
        self.temporal_patch_size = int(ip.temporal_patch_size)
        self.video_resize_min_pixels = int(video_min_pixels_config or ip.min_pixels)
        self.video_resize_max_pixels = int(video_max_pixels_config or ip.max_pixels)
        # torch's fused rescale+normalise: float32 mean / std times float32(1 / rescale_factor).
        inv = np.float32(1.0 / ip.rescale_factor)
        self._video_mean = (np.asarray(ip.image_mean, np.float32) * inv).reshape(1, 3, 1, 1)
        self._video_std = (np.asarray(ip.image_std, np.float32) * inv).reshape(1, 3, 1, 1)
        self.ids = {}
        vocab_size = len(tokenizer)
        for name, token in SPECIAL_TOKENS.items():
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id or not 0 <= tid < vocab_size:
                raise ValueError(f"{source}: the tokenizer has no {token} token (not a Qwen2.5-Omni tokenizer?)")
            self.ids[name] = int(tid)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **settings: Any) -> OmniProcessor:
        """Load tokenizer, ``Qwen2VLImageProcessor`` and ``WhisperFeatureExtractor`` from a local directory."""
        from transformers import AutoTokenizer, Qwen2VLImageProcessor, WhisperFeatureExtractor

        path = Path(model_dir)
        if not path.is_dir():
            raise ValueError(f"model_name_or_path {str(path)!r} is not a directory")
        if not (path / "preprocessor_config.json").is_file():
            raise ValueError(f"{path}: no preprocessor_config.json (image processor + feature extractor settings)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot load the tokenizer ({exc})") from exc
        image_processor = Qwen2VLImageProcessor.from_pretrained(str(path))
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(path))
        video_cfg: dict = {}
        if (path / "video_preprocessor_config.json").is_file():
            video_cfg = json.loads((path / "video_preprocessor_config.json").read_text())
        return cls(
            tokenizer,
            image_processor,
            feature_extractor,
            video_min_pixels_config=video_cfg.get("min_pixels"),
            video_max_pixels_config=video_cfg.get("max_pixels"),
            source=str(path),
            **settings,
        )

    def settings(self) -> dict[str, Any]:
        """Everything that changes the processor's output (for cache keys), JSON-serialisable."""
        return {
            "image_processor": self.image_processor.to_dict(),
            "feature_extractor": {k: v for k, v in self.feature_extractor.to_dict().items() if k != "mel_filters"},
            "vocab": len(self.tokenizer),
            "special_ids": self.ids,
            "video_resize_pixels": [self.video_resize_min_pixels, self.video_resize_max_pixels],
            "image_max_pixels": self.image_max_pixels,
            "image_min_pixels": self.image_min_pixels,
            "video_max_pixels": self.video_max_pixels,
            "video_min_pixels": self.video_min_pixels,
            "video_fps": self.video_fps,
            "video_maxlen": self.video_maxlen,
            "audio_sampling_rate": self.audio_sampling_rate,
            "use_audio_in_video": self.use_audio_in_video,
        }

    # ------------------------------------------------------------------------------------------------------ text

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a text piece (special-token strings inside it are parsed as the tokenizer does)."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    # ---------------------------------------------------------------------------------------------------- images

    def process_images(self, images: list[Image.Image]) -> VisionPatches:
        """The reference's image pre-resize, then ``Qwen2VLImageProcessor``."""
        prepared = [regularize_image(im, self.image_max_pixels, self.image_min_pixels, nearest=False) for im in images]
        out = self.image_processor(images=prepared, return_tensors="np")
        return VisionPatches(
            np.ascontiguousarray(out["pixel_values"], dtype=np.float32),
            np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(-1, 3),
        )

    # ---------------------------------------------------------------------------------------------------- videos

    def _resize_frames(self, frames: np.ndarray, height: int, width: int) -> np.ndarray:
        """Bicubic antialiased resize of (T, H, W, 3) uint8 frames, horizontal pass first (see module doc)."""
        t, h, w, _ = frames.shape
        if (h, w) == (height, width):
            return frames
        out = np.empty((t, height, width, 3), np.uint8)
        for i in range(t):
            im = Image.fromarray(frames[i])
            if w != width:
                im = im.resize((width, h), Image.Resampling.BICUBIC)
            if h != height:
                im = im.resize((width, height), Image.Resampling.BICUBIC)
            out[i] = np.asarray(im)
        return out

    def video_patches(self, frames: list[Image.Image]) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Patches and grid of one video given its sampled frames (all the same size)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        frames = list(frames)
        tp = self.temporal_patch_size
        if len(frames) % tp:  # the reference pads an odd count with the last frame (before resizing)
            frames += [frames[-1]] * (tp - len(frames) % tp)
        frames = [regularize_image(f, self.video_max_pixels, self.video_min_pixels, nearest=True) for f in frames]
        if len({f.size for f in frames}) != 1:
            raise ValueError(f"video frames differ in size: {sorted({f.size for f in frames})}")
        video = np.stack([np.asarray(f, dtype=np.uint8) for f in frames])  # (T, H, W, 3)
        h, w = video.shape[1:3]
        p, m = self.patch_size, self.merge_size
        rh, rw = smart_resize(
            h, w, factor=p * m, min_pixels=self.video_resize_min_pixels, max_pixels=self.video_resize_max_pixels
        )
        video = self._resize_frames(video, rh, rw)
        x = (video.transpose(0, 3, 1, 2).astype(np.float32) - self._video_mean) / self._video_std  # (T, C, H, W)
        gt, gh, gw = x.shape[0] // tp, rh // p, rw // p
        x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(gt * gh * gw, 3 * tp * p * p)), (gt, gh, gw)

    def process_videos(self, clips: list[VideoClip]) -> tuple[VisionPatches, np.ndarray]:
        """Patches, grids and ``video_second_per_grid = temporal_patch_size / fps`` of sampled clips."""
        patches, grids = [], []
        for clip in clips:
            pv, grid = self.video_patches(clip.frames)
            patches.append(pv)
            grids.append(grid)
        seconds = np.array([self.temporal_patch_size / c.fps for c in clips], dtype=np.float64)
        return VisionPatches(np.concatenate(patches), np.array(grids, dtype=np.int64).reshape(-1, 3)), seconds

    # ----------------------------------------------------------------------------------------------------- audio

    def audio_features(self, waveform: np.ndarray, name: str = "<audio>") -> AudioFeatures:
        """Whisper log-mel of a mono waveform at the processor's rate: valid frames only, long audio cut with a log.

        The reference pads every clip with zeros to ``n_samples`` and computes the whole spectrogram. A frame
        depends on 200 samples either side (reflect padding at the ends) and the clamp at ``max - 8`` on the
        global maximum, which zero frames (the floor, -10) never raise; so padding to ``length + 201`` samples
        gives the same valid frames at a fraction of the cost.
        """
        fe = self.feature_extractor
        x = np.asarray(waveform, dtype=np.float32).reshape(-1)
        dropped = 0.0
        if x.size > fe.n_samples:
            dropped = (x.size - fe.n_samples) / fe.sampling_rate
            logger.warning(
                "%s: audio is %.1f s; the feature extractor (chunk_length %s s in preprocessor_config.json) keeps "
                "the first %.1f s, %.1f s dropped as transformers' processor would",
                name, x.size / fe.sampling_rate, fe.chunk_length, fe.n_samples / fe.sampling_rate, dropped,
            )
            x = x[: fe.n_samples]
        frames = -(-x.size // fe.hop_length)
        if audio_token_count(frames) < 1:
            raise MediaError(name, f"audio too short ({x.size} samples at {fe.sampling_rate} Hz gives no token)")
        padded = np.zeros(min(fe.n_samples, x.size + fe.n_fft // 2 + 1), np.float32)
        padded[: x.size] = x
        # The numpy path of WhisperFeatureExtractor, called directly: its __call__ switches to torch when present.
        mel = fe._np_extract_fbank_features(padded[None], "cpu")[0]
        return AudioFeatures(np.ascontiguousarray(mel[:, :frames], dtype=np.float32), dropped)

    # ----------------------------------------------------------------------------------------------- token runs

    def image_tokens(self, grid_thw) -> list[int]:
        n = int(np.prod(grid_thw)) // self.merge_size**2
        return [self.ids["vision_bos"]] + [self.ids["image"]] * n + [self.ids["vision_eos"]]

    def video_tokens(self, grid_thw) -> list[int]:
        n = int(np.prod(grid_thw)) // self.merge_size**2
        return [self.ids["vision_bos"]] + [self.ids["video"]] * n + [self.ids["vision_eos"]]

    def audio_tokens(self, mel_frames: int) -> list[int]:
        return [self.ids["audio_bos"]] + [self.ids["audio"]] * audio_token_count(mel_frames) + [self.ids["audio_eos"]]

    def audio_in_video_tokens(self, grid_thw, second_per_grid: float, mel_frames: int) -> list[int]:
        """``<|vision_bos|><|audio_bos|>`` video chunk 0, audio chunk 0, video chunk 1, ... ``<|audio_eos|>
        <|vision_eos|>`` (``replace_multimodal_special_tokens`` with ``use_audio_in_video``)."""
        t, h, w = (int(v) for v in grid_thw)
        per_t = (h // self.merge_size) * (w // self.merge_size)
        # processor: numpy int t index * python float * 25, float64
        video_t = np.repeat(np.arange(t), per_t) * float(second_per_grid) * POSITION_ID_PER_SECONDS
        audio_t = np.arange(audio_token_count(mel_frames))
        per_chunk = int(POSITION_ID_PER_SECONDS * SECONDS_PER_CHUNK)
        v_counts, a_counts = chunk_counts(video_t, per_chunk), chunk_counts(audio_t, per_chunk)
        out = [self.ids["vision_bos"], self.ids["audio_bos"]]
        for j in range(max(len(v_counts), len(a_counts))):
            if j < len(v_counts):
                out += [self.ids["video"]] * v_counts[j]
            if j < len(a_counts):
                out += [self.ids["audio"]] * a_counts[j]
        return out + [self.ids["audio_eos"], self.ids["vision_eos"]]
