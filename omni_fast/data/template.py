"""The ``qwen2_omni`` chat template and the supervised encoding of one record: :func:`encode_sample`.

Rendering (reference: MindSpeed-MM ``func_utils/template.py``, template ``qwen2_omni``, copied from LLaMA-Factory)::

    <|im_start|>system\\n{system}<|im_end|>\\n                 (default "You are a helpful assistant.")
    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n      <- source of turn k
    {content}<|im_end|>\\n                                                  <- target of turn k

with ``<image>``, ``<video>``, ``<audio>`` placeholders in ``content`` expanded into the processor's token runs
(:mod:`omni_fast.data.processor`). For the same conversation this gives the ids that transformers 4.53's
``Qwen2_5OmniProcessor.apply_chat_template`` + ``__call__`` give (the hub chat template renders string contents
the same way, and every media run is bounded by special tokens, so tokenizing piecewise equals tokenizing the
whole string); tests/test_processor.py checks it against the real processor.

Labels (reference ``SupervisedDatasetProcessor._encode_data_example``): each (source, target) pair of a turn gets
``-100`` on the source unless ``train_on_prompt`` (then the source ids themselves, media placeholders included, as
the reference does) and the target ids on the target — the answer, its ``<|im_end|>`` and the ``\\n`` after it.
With ``mask_history`` only the last turn's target is labelled. No truncation happens here: the caller drops a
sample that does not fit its sequence length.

Audio in video (``use_audio_in_video``): a record that pairs each ``<video>`` with a following ``<audio>`` in the
same message (LLaMA-Factory's video+audio form: ``"<video><audio>What ..."``, ``videos`` and ``audios`` of equal
length) uses audio *i* as the sound of video *i*, and the ``<audio>`` placeholder disappears into the interleaved
block, exactly as the reference plugin. A record with videos and no ``<audio>`` at all takes each video's own
sound track (what transformers' ``use_audio_in_video`` means); the reference would silently ignore the flag there,
here a video without a sound track is an error naming the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from PIL import Image

from omni_fast.data.media import VideoClip, load_audio, load_image, load_video
from omni_fast.data.processor import OmniProcessor

__all__ = ["DEFAULT_SYSTEM", "IGNORE_INDEX", "EncodedSample", "encode_sample"]

DEFAULT_SYSTEM = "You are a helpful assistant."
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, AUDIO_PLACEHOLDER = "<image>", "<video>", "<audio>"
_PLACEHOLDERS = re.compile(r"(<image>|<video>|<audio>)")

ImageInput = Union[str, "os.PathLike[str]", Image.Image]
VideoInput = Union[str, "os.PathLike[str]", VideoClip]
AudioInput = Union[str, "os.PathLike[str]", np.ndarray]


@dataclass
class EncodedSample:
    """One training sample: the model's keyword inputs for a single row (unpadded) plus bookkeeping.

    Media arrays are ``None`` when the sample has none of that kind. ``input_features`` holds only valid mel frames,
    padded with zeros to the longest audio of this sample; ``feature_attention_mask`` marks them.
    """

    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64, IGNORE_INDEX where not trained
    attention_mask: np.ndarray  # (L,) int64, all ones
    pixel_values: np.ndarray | None = None  # (n_patches, 1176) float32
    image_grid_thw: np.ndarray | None = None  # (n_images, 3) int64
    pixel_values_videos: np.ndarray | None = None  # (n_patches, 1176) float32
    video_grid_thw: np.ndarray | None = None  # (n_videos, 3) int64
    video_second_per_grid: np.ndarray | None = None  # (n_videos,) float64
    input_features: np.ndarray | None = None  # (n_audios, n_mels, frames) float32, in token order
    feature_attention_mask: np.ndarray | None = None  # (n_audios, frames) int32
    use_audio_in_video: bool = False  # the sample has audio-in-video blocks
    image_token_counts: list[int] = field(default_factory=list)  # <|IMAGE|> tokens per image
    video_token_counts: list[int] = field(default_factory=list)  # <|VIDEO|> tokens per video
    audio_token_counts: list[int] = field(default_factory=list)  # <|AUDIO|> tokens per audio, in token order
    audio_seconds_dropped: float = 0.0  # audio beyond the feature extractor's n_samples (logged)

    def model_inputs(self) -> dict[str, Any]:
        """The thinker's keyword inputs for a batch of one (leading batch axis on the token arrays)."""
        out: dict[str, Any] = {
            "input_ids": self.input_ids[None],
            "attention_mask": self.attention_mask[None],
            "labels": self.labels[None],
            "use_audio_in_video": self.use_audio_in_video,
        }
        for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                     "video_second_per_grid", "input_features", "feature_attention_mask"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def _check_messages(messages: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    """(system, turns) after checking roles: optional system first, then user/assistant pairs."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
    system, offset = "", 0
    if messages[0]["role"] == "system":
        system, offset = messages[0]["content"], 1
        if _PLACEHOLDERS.search(system):
            raise ValueError("the system message contains a media placeholder; put media in a user message")
        messages = messages[1:]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(
                f"message {i + offset}: role {m['role']!r} where {expected!r} is expected "
                "(an optional system message, then user/assistant turns alternating, ending with the assistant)"
            )
    if len(messages) < 2 or len(messages) % 2:
        raise ValueError(f"{len(messages)} user/assistant messages: need complete user/assistant pairs")
    return system, list(messages)


def _check_audio_in_video(turns: list[dict[str, str]]) -> None:
    """Reference rule: in each message every <video> is followed by its own <audio> (no <audio> before a video)."""
    for m in turns:
        pending = 0
        for tag in _PLACEHOLDERS.findall(m["content"]):
            if tag == VIDEO_PLACEHOLDER:
                pending += 1
            elif tag == AUDIO_PLACEHOLDER:
                if pending == 0:
                    raise ValueError(
                        f"message content {m['content']!r}: with use_audio_in_video each <audio> must follow its "
                        "<video> in the same message"
                    )
                pending -= 1
        if pending:
            raise ValueError(
                f"message content {m['content']!r}: each <video> must be followed by an <audio> when using audio in "
                "video (or give no <audio> at all to use the videos' own sound tracks)"
            )


def _load_images(images: list[ImageInput]) -> list[Image.Image]:
    return [im if isinstance(im, Image.Image) else load_image(os.fspath(im)) for im in images]


def _load_videos(videos: list[VideoInput], processor: OmniProcessor) -> list[VideoClip]:
    return [
        v if isinstance(v, VideoClip)
        else load_video(os.fspath(v), video_fps=processor.video_fps, video_maxlen=processor.video_maxlen)
        for v in videos
    ]


def _load_audio(audio: AudioInput, processor: OmniProcessor) -> tuple[np.ndarray, str]:
    if isinstance(audio, np.ndarray):
        return audio, "<waveform>"
    path = os.fspath(audio)
    return load_audio(path, processor.audio_sampling_rate), path


def encode_sample(
    messages: list[dict[str, str]],
    images: list[ImageInput] | None,
    videos: list[VideoInput] | None,
    audios: list[AudioInput] | None,
    processor: OmniProcessor,
    *,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    use_audio_in_video: bool | None = None,
) -> EncodedSample:
    """Encode one record: template, media, placeholder expansion, labels.

    ``messages`` are ``[{"role": "system"|"user"|"assistant", "content": str}]`` with ``<image>``, ``<video>``,
    ``<audio>`` placeholders consumed in order by ``images``, ``videos``, ``audios`` (paths, or decoded
    ``PIL.Image`` / :class:`VideoClip` / mono waveform at the processor's rate). ``use_audio_in_video=None`` takes
    the processor's (``data.json``) setting. Raises ``ValueError`` on malformed messages, placeholder counts that
    differ from the media lists, and :class:`~omni_fast.data.media.MediaError` (a ``ValueError``) on bad media.
    """
    images, videos, audios = list(images or []), list(videos or []), list(audios or [])
    system, turns = _check_messages(messages)
    counts = {tag: sum(m["content"].count(tag) for m in turns) for tag in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER,
                                                                         AUDIO_PLACEHOLDER)}
    for tag, items, kind in ((IMAGE_PLACEHOLDER, images, "images"), (VIDEO_PLACEHOLDER, videos, "videos"),
                             (AUDIO_PLACEHOLDER, audios, "audios")):
        if counts[tag] != len(items):
            raise ValueError(f"{counts[tag]} {tag} placeholder(s) in the messages but {len(items)} {kind} given")
    if use_audio_in_video is None:
        use_audio_in_video = processor.use_audio_in_video
    av = bool(use_audio_in_video) and len(videos) > 0
    paired = av and len(audios) > 0  # LLaMA-Factory form: <video><audio> with separate audio files
    if paired:
        if len(videos) != len(audios):
            raise ValueError(
                f"number of videos ({len(videos)}) must match number of audios ({len(audios)}) when using audio "
                "in video"
            )
        _check_audio_in_video(turns)
    if av and not paired:
        for v in videos:
            if isinstance(v, VideoClip):
                raise ValueError("use_audio_in_video with a decoded VideoClip: give the video's path for its sound")

    out = EncodedSample(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    image_runs: list[list[int]] = []
    if images:
        patches = processor.process_images(_load_images(images))
        out.pixel_values, out.image_grid_thw = patches.pixel_values, patches.grid_thw
        image_runs = [processor.image_tokens(g) for g in patches.grid_thw]
        out.image_token_counts = [len(r) - 2 for r in image_runs]
    clips: list[VideoClip] = []
    if videos:
        clips = _load_videos(videos, processor)
        patches, seconds = processor.process_videos(clips)
        out.pixel_values_videos, out.video_grid_thw, out.video_second_per_grid = (
            patches.pixel_values, patches.grid_thw, seconds
        )
    # Audio waveforms in token order: the audios list, or (audio-in-video from tracks) one per video.
    waves = [_load_audio(a, processor) for a in audios] if not (av and not paired) else [
        _load_audio(c.path, processor) for c in clips
    ]
    mel_frames: list[int] = []
    if waves:
        feats = [processor.audio_features(w, name) for w, name in waves]
        out.audio_seconds_dropped = float(sum(f.dropped_seconds for f in feats))
        mel_frames = [f.features.shape[1] for f in feats]
        n_mels, longest = feats[0].features.shape[0], max(mel_frames)
        out.input_features = np.zeros((len(feats), n_mels, longest), np.float32)
        out.feature_attention_mask = np.zeros((len(feats), longest), np.int32)
        for i, f in enumerate(feats):
            out.input_features[i, :, : mel_frames[i]] = f.features
            out.feature_attention_mask[i, : mel_frames[i]] = 1

    # Token runs of each placeholder, in order of appearance.
    next_image, next_video, next_audio = iter(image_runs), iter(range(len(clips))), iter(range(len(waves)))
    audio_counts: list[int] = []
    video_counts: list[int] = []

    def video_run() -> list[int]:
        i = next(next_video)
        grid, spg = out.video_grid_thw[i], float(out.video_second_per_grid[i])
        if av:
            a = next(next_audio)
            run = processor.audio_in_video_tokens(grid, spg, mel_frames[a])
            audio_counts.append(run.count(processor.ids["audio"]))
            video_counts.append(run.count(processor.ids["video"]))
            return run
        run = processor.video_tokens(grid)
        video_counts.append(len(run) - 2)
        return run

    def audio_run() -> list[int]:
        run = processor.audio_tokens(mel_frames[next(next_audio)])
        audio_counts.append(len(run) - 2)
        return run

    def encode(prefix: str, content: str, suffix: str) -> list[int]:
        ids: list[int] = []
        text = prefix
        for piece in _PLACEHOLDERS.split(content):
            if piece == AUDIO_PLACEHOLDER and av:
                continue  # paired form: the reference deletes it, its sound is inside the video's block
            if piece in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, AUDIO_PLACEHOLDER):
                # every run starts and ends with a special token, so pieces tokenize as the whole string would
                ids += processor.encode_text(text)
                text = ""
                ids += next(next_image) if piece == IMAGE_PLACEHOLDER else (
                    video_run() if piece == VIDEO_PLACEHOLDER else audio_run()
                )
            else:
                text += piece
        return ids + processor.encode_text(text + suffix)

    pairs = []
    for k in range(0, len(turns), 2):
        head = f"<|im_start|>system\n{system or DEFAULT_SYSTEM}<|im_end|>\n" if k == 0 else ""
        source = encode(head + "<|im_start|>user\n", turns[k]["content"], "<|im_end|>\n<|im_start|>assistant\n")
        target = encode("", turns[k + 1]["content"], "<|im_end|>\n")
        pairs.append((source, target))
    input_ids: list[int] = []
    labels: list[int] = []
    for k, (source, target) in enumerate(pairs):
        last = k == len(pairs) - 1
        input_ids += source + target
        labels += source if train_on_prompt else [IGNORE_INDEX] * len(source)
        labels += [IGNORE_INDEX] * len(target) if mask_history and not last else target
    out.input_ids = np.asarray(input_ids, np.int64)
    out.labels = np.asarray(labels, np.int64)
    out.attention_mask = np.ones(len(input_ids), np.int64)
    out.use_audio_in_video = av
    out.video_token_counts = video_counts
    out.audio_token_counts = audio_counts
    return out
