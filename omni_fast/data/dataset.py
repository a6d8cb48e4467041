"""The samples of a ``data.json``: records read and checked, encoded once into the cache, cut to the sequence length.

:func:`build_dataset` (what the trainer calls) does, in order:

1. :func:`read_records` — MindSpeed-MM's "huggingface" loader (``get_qwen2vl_dataset`` + ``align_dataset``):

   * ``basic_parameters.dataset``: JSON (an array of records) or JSONL files joined by ``,``. A relative path is
     looked up under ``dataset_dir`` first, then as given (from the working directory), the reference's rule for
     media; the files are concatenated in order and ``max_samples`` keeps the first N records of the joined set.
   * Records in ShareGPT form; ``attr`` says which keys hold the messages, the role and the content, which role
     tags mean user / assistant / system, and which keys hold ``images``, ``videos``, ``audios`` and the system
     prompt. The mllm format (``{"images": [...], "messages": [{"role", "content"}]}``, what the LLaVA converter
     writes), LLaMA-Factory's demo files and raw LLaVA records (``conversations`` with ``from`` / ``value``,
     ``image`` a single path) are all this form with different ``attr``.
   * ``<image>``, ``<video>``, ``<audio>`` placeholders in the message text; their counts over the conversation
     must equal the lengths of the media lists. A record without a media key (or with an empty list) is
     text-only; text-only and media records mix freely.
   * Media paths: ``dataset_dir/path`` when that file exists, else the path as given (the reference's rule).
   * ``use_audio_in_video``: the run's value (``preprocess_parameters``), overridden by a boolean
     ``use_audio_in_video`` key on the record; it applies to records with videos (the template's rule: a video
     takes audio *i* as its sound when the record lists audios — then each ``<video>`` must be followed by its
     ``<audio>`` in the same message — and its own sound track otherwise).

   These are the cheap checks (structure, roles, counts, files exist): a bad record stops the run before any
   training with a :class:`DataError` naming ``file#index``, or, with ``basic_parameters.skip_bad_records: true``,
   is skipped and counted in the log.
2. Encoding with the ``qwen2_omni`` template (:func:`omni_fast.data.template.encode_sample`) into the
   preprocessing cache (:mod:`omni_fast.data.cache`), or reusing it. Undecodable media surface here, under the
   same error-or-skip rule, so nothing fails mid-epoch.
3. Cutting to ``--seq-length`` (:func:`truncate_sample`): LLaMA-Factory's turn-wise truncation, except that a
   media block is never cut; a sample that cannot fit is skipped and counted in the log.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omni_fast.data.cache import PreprocessCache, ShardReader, cache_key, processor_files, write_shard
from omni_fast.data.config import DataConfig, DatasetAttr
from omni_fast.data.media import MediaError
from omni_fast.data.processor import OmniProcessor
from omni_fast.data.template import (
    AUDIO_PLACEHOLDER,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    EncodedSample,
    encode_sample,
)

__all__ = [
    "DataError",
    "DatasetSample",
    "DatasetStats",
    "OmniDataset",
    "Record",
    "SkipLog",
    "build_dataset",
    "encode_record",
    "make_processor",
    "read_records",
    "resolve_data_files",
    "truncate_sample",
]

logger = logging.getLogger("omni_fast.data")

_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, AUDIO_PLACEHOLDER)))
USER, ASSISTANT, OBSERVATION, FUNCTION, SYSTEM = "user", "assistant", "observation", "function", "system"


class DataError(ValueError):
    """A bad record or data file; ``where`` is ``file`` or ``file#index`` (index of the record in its file)."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where = where
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep the three fields across process boundaries (preprocessing workers)
        return (DataError, (self.where, self.reason, self.detail))


@dataclass(frozen=True)
class Record:
    """One conversation in the aligned form: ``messages`` alternate user and assistant, ending with an answer."""

    source: str  # "file#index", for messages
    messages: tuple[dict[str, str], ...]
    system: str | None = None
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    audios: tuple[str, ...] = ()
    use_audio_in_video: bool = False


@dataclass
class SkipLog:
    """Counts of skipped records by reason, with the first few places, for one log line per stage."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    keep_examples: int = 3

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.keep_examples:
            shown.append(f"{where}: {detail}")

    def add_error(self, error: DataError) -> None:
        self.add(error.reason, error.where, error.detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self, stage: str, seen: int) -> str:
        """A one-paragraph summary; empty when nothing was skipped."""
        if not self.counts:
            return ""
        parts = [f"{stage}: skipped {self.total} of {seen} records"]
        for reason, n in self.counts.most_common():
            parts.append(f"  {n} x {reason}, e.g. " + " | ".join(self.examples[reason]))
        return "\n".join(parts)

    def log(self, stage: str, seen: int) -> None:
        text = self.report(stage, seen)
        if text:
            logger.warning("%s", text)


# ---------------------------------------------------------------------------------------------------- files


def _resolve(name: str, dataset_dir: str) -> str | None:
    """``dataset_dir/name`` if that file exists, else ``name`` if it exists, else None (the reference's rule)."""
    joined = os.path.join(dataset_dir, name)
    if os.path.isfile(joined):
        return joined
    if os.path.isfile(name):
        return name
    return None


def resolve_data_files(config: DataConfig) -> list[str]:
    """The data files of ``basic_parameters.dataset``, resolved; a missing one is an error naming both tries."""
    out = []
    for name in config.basic.dataset:
        path = _resolve(name, config.basic.dataset_dir)
        if path is None:
            raise ValueError(
                f"{config.source}: dataset_param.basic_parameters.dataset: data file {name!r} not found "
                f"(looked for {os.path.join(config.basic.dataset_dir, name)!r} and {name!r} from {os.getcwd()!r})"
            )
        out.append(path)
    return out


def load_json_records(path: str) -> list[Any]:
    """The records of a JSON array file or a JSONL file (one JSON value per non-empty line)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, "unreadable data file", f"cannot read the data file ({e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                path, "malformed JSON", f"malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}"
            ) from None
        return records
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            hint = "" if lineno > 1 else " (a .json file must hold an array of records; JSONL holds one per line)"
            raise DataError(
                path, "malformed JSON", f"malformed JSON at line {lineno} column {e.colno}: {e.msg}{hint}"
            ) from None
    return records


# ---------------------------------------------------------------------------------------------------- records


class _Aligner:
    """Turns raw records into :class:`Record` with ``attr``'s mapping and the cheap checks."""

    def __init__(self, config: DataConfig):
        self.attr: DatasetAttr = config.attr
        self.dataset_dir = config.basic.dataset_dir
        self.use_audio_in_video = config.preprocess.use_audio_in_video
        a = self.attr
        self.role_of = {
            tag: role
            for tag, role in (
                (a.user_tag, USER),
                (a.assistant_tag, ASSISTANT),
                (a.observation_tag, OBSERVATION),
                (a.function_tag, FUNCTION),
                (a.system_tag, SYSTEM),
            )
            if tag is not None
        }
        self._exists: dict[str, str | None] = {}

    def _media(self, raw: dict, key: str | None, kind: str, where: str) -> tuple[str, ...]:
        if key is None:
            return ()
        value = raw.get(key)
        if value is None:
            return ()
        if isinstance(value, str):  # LLaVA: "image": "0001.jpg"
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise DataError(where, "malformed record", f"{key!r} must be a list of {kind} paths, got {value!r}")
        out = []
        for name in value:
            if name not in self._exists:
                self._exists[name] = _resolve(name, self.dataset_dir)
            path = self._exists[name]
            if path is None:
                raise DataError(
                    where,
                    "missing media file",
                    f"{kind} file {name!r} not found (looked for {os.path.join(self.dataset_dir, name)!r} "
                    f"and {name!r})",
                )
            out.append(path)
        return tuple(out)

    def _unused_key_hint(self, raw: dict, kind: str) -> str:
        """When a placeholder has no media, say if the record has a key that ``attr`` does not map."""
        column = getattr(self.attr, kind)
        for key in (kind, kind[:-1]):
            if key in raw and column != key:
                return f"; the record has a {key!r} key but dataset_param.attr.{kind} is {column!r}"
        return ""

    def align(self, raw: Any, where: str) -> Record:
        a = self.attr
        if not isinstance(raw, dict):
            raise DataError(where, "malformed record", f"a record must be a JSON object, got {type(raw).__name__}")
        if a.messages not in raw:
            others = [k for k in ("messages", "conversations") if k in raw and k != a.messages]
            hint = f" (it has {others[0]!r}: set dataset_param.attr.messages)" if others else ""
            raise DataError(where, "malformed record", f"no {a.messages!r} key{hint}")
        messages = raw[a.messages]
        if not isinstance(messages, list) or not messages:
            raise DataError(where, "malformed record", f"{a.messages!r} must be a non-empty list of messages")
        turns: list[tuple[str, str, int]] = []  # (role, content, index in the record's message list)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or a.role_tag not in m or a.content_tag not in m:
                raise DataError(
                    where,
                    "malformed record",
                    f"message {i} must be an object with {a.role_tag!r} and {a.content_tag!r} keys, got {m!r}",
                )
            tag, content = m[a.role_tag], m[a.content_tag]
            if not isinstance(content, str):
                raise DataError(where, "malformed record", f"message {i} content must be a string, got {content!r}")
            if tag not in self.role_of:
                known = ", ".join(f"{t!r} ({r})" for t, r in self.role_of.items())
                raise DataError(where, "unknown role", f"message {i} has unknown role {tag!r}; known tags: {known}")
            if self.role_of[tag] in (OBSERVATION, FUNCTION):
                raise DataError(
                    where,
                    "unsupported role",
                    f"message {i} is a tool turn ({tag!r} = {self.role_of[tag]}); the qwen2_omni encoder supports "
                    "user and assistant turns only",
                )
            turns.append((self.role_of[tag], content, i))

        system = None
        if a.system is not None and raw.get(a.system) is not None:
            if not isinstance(raw[a.system], str):
                raise DataError(where, "malformed record", f"{a.system!r} must be a string, got {raw[a.system]!r}")
            system = raw[a.system]
        if turns[0][0] == SYSTEM:  # a leading system message wins over the system column, as in the reference
            system = turns[0][1]
            turns = turns[1:]
        if system is not None and any(p in system for p in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, AUDIO_PLACEHOLDER)):
            raise DataError(where, "malformed record", "the system prompt holds a media placeholder")
        for k, (role, _, i) in enumerate(turns):
            expected = USER if k % 2 == 0 else ASSISTANT
            if role != expected:
                raise DataError(
                    where,
                    "bad role order",
                    f"message {i} has role {role!r} where {expected!r} is expected "
                    "(turns alternate user and assistant, after an optional leading system message)",
                )
        if not turns or len(turns) % 2:
            raise DataError(
                where, "bad role order", f"{len(turns)} non-system messages: the conversation must end with an answer"
            )

        images = self._media(raw, a.images, "image", where)
        videos = self._media(raw, a.videos, "video", where)
        audios = self._media(raw, a.audios, "audio", where)
        counts = {
            "images": (IMAGE_PLACEHOLDER, len(images)),
            "videos": (VIDEO_PLACEHOLDER, len(videos)),
            "audios": (AUDIO_PLACEHOLDER, len(audios)),
        }
        for kind, (placeholder, n_media) in counts.items():
            # the system prompt is not searched: the reference expands placeholders in the messages only
            n_text = sum(content.count(placeholder) for _, content, _ in turns)
            if n_text != n_media:
                hint = self._unused_key_hint(raw, kind) if n_media == 0 else ""
                raise DataError(
                    where,
                    "placeholder count mismatch",
                    f"{n_text} {placeholder} placeholder(s) in the messages but {n_media} {kind}{hint}",
                )

        flag = raw.get("use_audio_in_video", self.use_audio_in_video)
        if not isinstance(flag, bool):
            raise DataError(where, "malformed record", f"'use_audio_in_video' must be true or false, got {flag!r}")
        # the template's rule: with the flag, videos take audio *i* as their sound when the record lists audios
        # ("<video><audio>", LLaMA-Factory's form), else their own sound tracks
        use_audio_in_video = flag and bool(videos)
        if use_audio_in_video and audios:
            if len(videos) != len(audios):
                raise DataError(
                    where,
                    "audio in video mismatch",
                    f"use_audio_in_video needs one audio per video, got {len(videos)} videos and {len(audios)} audios",
                )
            for _, content, i in turns:
                pending = 0
                for tag in _PLACEHOLDER_RE.findall(content):
                    pending += 1 if tag == VIDEO_PLACEHOLDER else -1 if tag == AUDIO_PLACEHOLDER else 0
                    if pending < 0:
                        break
                if pending:
                    raise DataError(
                        where,
                        "audio in video mismatch",
                        f"message {i}: with use_audio_in_video each {VIDEO_PLACEHOLDER} must be followed by its "
                        f"{AUDIO_PLACEHOLDER} in the same message",
                    )
        return Record(
            source=where,
            messages=tuple({"role": role, "content": content} for role, content, _ in turns),
            system=system,
            images=images,
            videos=videos,
            audios=audios,
            use_audio_in_video=use_audio_in_video,
        )


def read_records(config: DataConfig, skipped: SkipLog | None = None) -> list[Record]:
    """All records of the data.json's files, aligned and checked (cheap checks only; see the module doc).

    A bad record raises :class:`DataError` naming ``file#index``, unless ``basic_parameters.skip_bad_records`` is
    set: then it is left out and counted in ``skipped`` (and in the log). A malformed or missing file always raises.
    """
    skip = config.basic.skip_bad_records
    skipped = SkipLog() if skipped is None else skipped
    aligner = _Aligner(config)
    limit = config.basic.max_samples
    records: list[Record] = []
    seen = 0
    for path in resolve_data_files(config):
        raw_records = load_json_records(path)
        if not isinstance(raw_records, list):
            raise DataError(path, "malformed JSON", f"the file must hold a list of records, got {type(raw_records)}")
        if limit is not None:
            # like the reference: max_samples cuts the joined list before any record is checked
            raw_records = raw_records[: limit - seen]
        for i, raw in enumerate(raw_records):
            try:
                records.append(aligner.align(raw, f"{path}#{i}"))
            except DataError as e:
                if not skip:
                    raise
                skipped.add_error(e)
        seen += len(raw_records)
        if limit is not None and seen >= limit:
            break
    skipped.log("reading records", seen)
    if not records:
        raise ValueError(f"{config.source}: no usable records in {', '.join(config.basic.dataset)}")
    return records


# ---------------------------------------------------------------------------------------------------- encoding

# The arrays that hold decoded media; with ``basic_parameters.cache_media: false`` they are not stored in the cache
# and are recomputed from the files when a sample is read (what the reference does for every sample).
MEDIA_FIELDS = ("pixel_values", "pixel_values_videos", "input_features")


@dataclass
class DatasetSample(EncodedSample):
    """An :class:`EncodedSample` read from a dataset, with the ``file#index`` of its record."""

    sample_id: str = ""


def encode_record(record: Record, processor: OmniProcessor, config: DataConfig) -> EncodedSample:
    """The template + processor encoding of one record (no truncation). Raises :class:`DataError`."""
    system = [{"role": SYSTEM, "content": record.system}] if record.system is not None else []
    try:
        return encode_sample(
            system + list(record.messages),
            list(record.images),
            list(record.videos),
            list(record.audios),
            processor,
            train_on_prompt=config.basic.train_on_prompt,
            mask_history=config.basic.mask_history,
            use_audio_in_video=record.use_audio_in_video,
        )
    except MediaError as e:
        raise DataError(record.source, "undecodable media", str(e)) from e
    except ValueError as e:
        raise DataError(record.source, "cannot encode", str(e)) from e


def _encode_shard(
    records: list[Record], first: int, processor: OmniProcessor, config: DataConfig, path: Path, key: str
) -> dict:
    """Encode ``records`` (global indices from ``first``) and write them as one cache shard; returns its meta."""
    samples: list[EncodedSample] = []
    indices: list[int] = []
    skipped: list[list[str]] = []
    for k, record in enumerate(records):
        try:
            sample = encode_record(record, processor, config)
        except DataError as e:
            if not config.basic.skip_bad_records:
                raise
            skipped.append([e.reason, e.where, e.detail])
            continue
        if not config.basic.cache_media:
            for name in MEDIA_FIELDS:
                setattr(sample, name, None)
        samples.append(sample)
        indices.append(first + k)
    meta = {"key": key, "first": first, "count": len(records), "records": indices, "skipped": skipped}
    write_shard(path, samples, meta)
    return meta


_WORKER_PROCESSOR: dict[str, OmniProcessor] = {}


def _worker_encode_shard(args: tuple) -> dict:
    """Process-pool entry point: one processor per worker process, built on first use."""
    records, first, config, path, key = args
    name = config.preprocess.model_name_or_path
    if name not in _WORKER_PROCESSOR:
        _WORKER_PROCESSOR[name] = make_processor(config)
    return _encode_shard(records, first, _WORKER_PROCESSOR[name], config, path, key)


def make_processor(config: DataConfig) -> OmniProcessor:
    """The :class:`OmniProcessor` of ``preprocess_parameters`` (``model_name_or_path`` + the media settings)."""
    p = config.preprocess
    if p.model_name_or_path is None:
        raise ValueError(
            f"{config.source}: dataset_param.preprocess_parameters.model_name_or_path is required (the original "
            "Hugging Face directory: tokenizer and preprocessor_config.json)"
        )
    return OmniProcessor.from_pretrained(
        p.model_name_or_path,
        image_max_pixels=p.image_max_pixels,
        image_min_pixels=p.image_min_pixels,
        video_max_pixels=p.video_max_pixels,
        video_min_pixels=p.video_min_pixels,
        video_fps=p.video_fps,
        video_maxlen=p.video_maxlen,
        audio_sampling_rate=p.audio_sampling_rate,
        use_audio_in_video=p.use_audio_in_video,
    )


# ---------------------------------------------------------------------------------------------------- truncation


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of a turn's budget between its prompt (source) and its answer (target)."""
    if target_len * 2 < cutoff_len:  # truncate source
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # truncate target
        max_target_len = cutoff_len - source_len
    else:  # truncate both
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    new_source_len = min(max_source_len, source_len)
    return new_source_len, new_target_len


def _media_spans(ids: np.ndarray, tok: dict[str, int]) -> list[tuple[int, int, str]] | None:
    """(start, end, kind) of every media block in token order; kind is image, video, audio or av (audio in video).

    None when the blocks are not well formed (e.g. a special token typed inside a message), so the caller does not
    cut such a sample.
    """
    n = ids.size
    vision_eos = np.flatnonzero(ids == tok["vision_eos"])
    audio_eos = np.flatnonzero(ids == tok["audio_eos"])
    starts = np.flatnonzero((ids == tok["vision_bos"]) | (ids == tok["audio_bos"]))
    spans: list[tuple[int, int, str]] = []
    end = 0
    for p in starts.tolist():
        if p < end:
            continue  # the audio_bos of an audio-in-video block
        if ids[p] == tok["vision_bos"]:
            nxt = int(ids[p + 1]) if p + 1 < n else -1
            kind = {tok["image"]: "image", tok["video"]: "video", tok["audio_bos"]: "av"}.get(nxt)
            closers = vision_eos
        else:
            kind, closers = "audio", audio_eos
        k = np.searchsorted(closers, p)
        if kind is None or k == closers.size:
            return None
        end = int(closers[k]) + 1
        spans.append((p, end, kind))
    return spans


def _turn_bounds(ids: np.ndarray, n_pairs: int, tok: dict[str, int], heads: dict[str, list[int]]) -> list | None:
    """[(source_start, target_start, target_end)] of each turn, from the template's ``<|im_start|>`` markers.

    The qwen2_omni rendering is ``system, (user, assistant) * n``, each opened by ``<|im_start|>``; the target of a
    turn starts after ``<|im_start|>assistant\\n``. None when the markers do not match that (a special token typed
    inside a message).
    """
    marks = np.flatnonzero(ids == tok["im_start"])
    if marks.size != 1 + 2 * n_pairs:
        return None
    bounds = []
    for k in range(n_pairs):
        user, assistant = int(marks[2 * k + 1]), int(marks[2 * k + 2])
        for at, head in ((user, heads["user"]), (assistant, heads["assistant"])):
            if ids[at + 1 : at + 1 + len(head)].tolist() != head:
                return None
        source = 0 if k == 0 else user
        target = assistant + 1 + len(heads["assistant"])
        end = int(marks[2 * k + 3]) if k + 1 < n_pairs else ids.size
        bounds.append((source, target, end))
    return bounds


def truncate_sample(
    sample: EncodedSample, seq_length: int, n_pairs: int, processor: OmniProcessor, mask_history: bool
) -> EncodedSample | str:
    """``sample`` cut to ``seq_length`` tokens, or the reason it cannot be.

    The turns are cut as LLaMA-Factory / MindSpeed-MM do (``infer_seqlen`` per turn, later turns dropped; with
    ``mask_history`` the last turns have priority), except that a media block is never cut: a turn keeps at least
    everything up to the end of its last media block, and a turn whose media do not fit is dropped with all the
    turns after it. The media of dropped turns leave the sample's arrays too. A sample left without any kept turn,
    or without a trained label, cannot be used (the reason is returned).
    """
    ids = sample.input_ids
    if ids.size <= seq_length:
        return sample
    tok = processor.ids
    heads = {"user": processor.encode_text("user\n"), "assistant": processor.encode_text("assistant\n")}
    bounds = _turn_bounds(ids, n_pairs, tok, heads)
    spans = _media_spans(ids, tok)
    if bounds is None or spans is None:
        return "too long, and its turns cannot be told apart to cut it"

    def media_end(lo: int, hi: int) -> int:
        """Length of [lo, hi) that must be kept so that no media block in it is cut."""
        inside = [e for s, e, _ in spans if lo <= s < hi]
        return max(inside) - lo if inside else 0

    kept: list[tuple[int, int]] = []  # token ranges, in any order
    total = 0
    order = range(n_pairs - 1, -1, -1) if mask_history else range(n_pairs)
    for k in order:
        if total >= seq_length:
            break
        src, tgt, end = bounds[k]
        budget = seq_length - total
        s, t = infer_seqlen(tgt - src, end - tgt, budget)
        s_min, t_min = media_end(src, tgt), media_end(tgt, end)
        if s < s_min:
            s, t = s_min, min(end - tgt, budget - s_min)
        if t < t_min or s + t > budget:
            break
        kept += [(src, src + s), (tgt, tgt + t)]
        total += s + t
    if not kept:
        return f"does not fit in seq_length {seq_length}: its first turn's media need more tokens"
    kept.sort()
    take = np.concatenate([np.arange(a, b) for a, b in kept])
    labels = sample.labels[take]
    if not (labels != IGNORE_INDEX).any():
        return f"no trained token left after cutting to seq_length {seq_length}"
    keep_span = np.array([any(a <= s and e <= b for a, b in kept) for s, e, _ in spans], bool)
    kinds = np.array([kind for _, _, kind in spans])
    return _select_media(sample, ids[take], labels, kinds, keep_span)


def _select_media(
    sample: EncodedSample, ids: np.ndarray, labels: np.ndarray, kinds: np.ndarray, keep: np.ndarray
) -> EncodedSample:
    """A copy of ``sample`` with the new tokens and only the media whose blocks are kept (``kinds``/``keep`` are
    per block in token order: images are the image blocks, videos the video and av blocks, audios the audio and av
    blocks, each in order)."""
    out = dataclasses.replace(sample, input_ids=ids, labels=labels, attention_mask=np.ones(ids.size, np.int64))
    image_keep = keep[kinds == "image"]
    video_keep = keep[(kinds == "video") | (kinds == "av")]
    audio_keep = keep[(kinds == "audio") | (kinds == "av")]

    def rows(grids: np.ndarray, keep_items: np.ndarray) -> np.ndarray:
        return np.repeat(keep_items, np.prod(grids, axis=1))

    if sample.image_grid_thw is not None:
        if not image_keep.any():
            out.pixel_values = out.image_grid_thw = None
        elif not image_keep.all():
            if sample.pixel_values is not None:
                out.pixel_values = sample.pixel_values[rows(sample.image_grid_thw, image_keep)]
            out.image_grid_thw = sample.image_grid_thw[image_keep]
        out.image_token_counts = [c for c, k in zip(sample.image_token_counts, image_keep) if k]
    if sample.video_grid_thw is not None:
        if not video_keep.any():
            out.pixel_values_videos = out.video_grid_thw = out.video_second_per_grid = None
        elif not video_keep.all():
            if sample.pixel_values_videos is not None:
                out.pixel_values_videos = sample.pixel_values_videos[rows(sample.video_grid_thw, video_keep)]
            out.video_grid_thw = sample.video_grid_thw[video_keep]
            out.video_second_per_grid = sample.video_second_per_grid[video_keep]
        out.video_token_counts = [c for c, k in zip(sample.video_token_counts, video_keep) if k]
    if sample.feature_attention_mask is not None:
        if not audio_keep.any():
            out.input_features = out.feature_attention_mask = None
        elif not audio_keep.all():
            mask = sample.feature_attention_mask[audio_keep]
            longest = int(mask.sum(axis=1).max())
            out.feature_attention_mask = mask[:, :longest]
            if sample.input_features is not None:
                out.input_features = sample.input_features[audio_keep][:, :, :longest]
        out.audio_token_counts = [c for c, k in zip(sample.audio_token_counts, audio_keep) if k]
    out.use_audio_in_video = bool(sample.use_audio_in_video and (kinds[keep] == "av").any())
    return out


# ---------------------------------------------------------------------------------------------------- dataset


def default_cache_dir() -> str:
    """Where the cache goes when data.json has no ``cache_dir``: ``$OMNI_FAST_CACHE/data`` (default ~/.cache)."""
    return os.path.join(os.path.expanduser(os.environ.get("OMNI_FAST_CACHE", "~/.cache/omni_fast")), "data")


@dataclass
class DatasetStats:
    """What building a dataset did; every skip is also in the log."""

    records: int = 0  # records read (after max_samples)
    samples: int = 0  # samples in the dataset
    truncated: int = 0  # samples cut to seq_length
    from_cache: bool = False
    seconds: float = 0.0  # encoding into the cache, or opening the cache (without reading records / the processor)
    cache_dir: str = ""
    skipped_reading: SkipLog = field(default_factory=SkipLog)
    skipped_encoding: SkipLog = field(default_factory=SkipLog)
    skipped_length: SkipLog = field(default_factory=SkipLog)


class OmniDataset(Sequence):
    """The encoded samples of a data.json, read lazily from the preprocessing cache; ``ds[i]`` is a
    :class:`DatasetSample` (cut to ``seq_length`` where needed)."""

    def __init__(
        self,
        config: DataConfig,
        processor: OmniProcessor,
        records: list[Record],
        readers: list[ShardReader],
        entries: list[tuple[int, int, int]],
        seq_length: int | None,
        stats: DatasetStats,
    ):
        self.config = config
        self.processor = processor
        self.records = records
        self._readers = readers
        self._entries = entries  # (shard, index in shard, record index)
        self.seq_length = seq_length
        self.stats = stats

    def __len__(self) -> int:
        return len(self._entries)

    def sample_id(self, i: int) -> str:
        return self.records[self._entries[i][2]].source

    def _load(self, shard: int, local: int, record: Record, media: bool) -> DatasetSample:
        reader = self._readers[shard]
        values = reader.fields(local, skip=() if media else MEDIA_FIELDS)
        if media and not self.config.basic.cache_media:
            fresh = encode_record(record, self.processor, self.config)
            if not np.array_equal(fresh.input_ids, values["input_ids"]):
                raise DataError(
                    record.source,
                    "changed since preprocessing",
                    "re-encoding the record gives other tokens than the cache holds (a media file changed?); "
                    "rebuild the cache (basic_parameters.overwrite_cache: true)",
                )
            for name in MEDIA_FIELDS:
                values[name] = getattr(fresh, name)
        return DatasetSample(**values, sample_id=record.source)

    def get(self, i: int, *, media: bool = True) -> DatasetSample:
        """Sample ``i``; ``media=False`` leaves the decoded media arrays out (fast: tokens and grids only)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        shard, local, rec = self._entries[i]
        record = self.records[rec]
        sample = self._load(shard, local, record, media)
        if self.seq_length is not None and sample.input_ids.size > self.seq_length:
            cut = truncate_sample(
                sample, self.seq_length, len(record.messages) // 2, self.processor, self.config.basic.mask_history
            )
            if isinstance(cut, str):  # decided when the dataset was opened; the same inputs give the same answer
                raise RuntimeError(f"{record.source}: {cut}")
            sample = cut
        return sample

    def __getitem__(self, i: int) -> DatasetSample:  # type: ignore[override]
        return self.get(int(i))


def _encode_all(
    records: list[Record], config: DataConfig, processor: OmniProcessor, cache: PreprocessCache
) -> dict:
    """Encode every record into shards (reusing shards a crashed run already wrote) and write the manifest."""
    size = config.basic.preprocessing_batch_size
    jobs = []
    metas: dict[int, dict] = {}
    for index, first in enumerate(range(0, len(records), size)):
        path = cache.shard_path(index)
        chunk = records[first : first + size]
        if path.is_file():
            try:
                meta = ShardReader(path).meta
            except (OSError, ValueError):
                meta = {}
            # a shard a crashed run wrote for the same key and the same records (the shard size is not in the key)
            if (meta.get("key"), meta.get("first"), meta.get("count")) == (cache.key, first, len(chunk)):
                metas[index] = meta
                continue
        jobs.append((index, chunk, first, path))
    workers = min(config.basic.preprocessing_num_workers or 1, len(jobs))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent may hold MindSpore's threads, which a forked child must not inherit
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(
                _worker_encode_shard, [(recs, first, config, path, cache.key) for _, recs, first, path in jobs]
            )
            for (index, *_), meta in zip(jobs, results):
                metas[index] = meta
    else:
        for index, recs, first, path in jobs:
            metas[index] = _encode_shard(recs, first, processor, config, path, cache.key)
    shards = [
        {"file": cache.shard_path(i).name, "first": metas[i]["first"], "records": metas[i]["records"]}
        for i in sorted(metas)
    ]
    skipped = [entry for i in sorted(metas) for entry in metas[i]["skipped"]]
    return cache.write_manifest(shards, {"records": len(records), "skipped": skipped})


def _is_local_rank0() -> bool:
    return os.environ.get("LOCAL_RANK", "0") in ("", "0", "-1")


def build_dataset(
    config: DataConfig, seq_length: int | None, *, processor: OmniProcessor | None = None
) -> OmniDataset:
    """Read, check, encode (or reuse the cache) and index the samples of a data.json.

    ``seq_length`` is the trainer's ``--seq-length``: longer samples are cut (:func:`truncate_sample`) or skipped
    and counted. Bad records raise :class:`DataError` unless ``skip_bad_records`` (see the module doc).
    """
    stats = DatasetStats()
    records = read_records(config, stats.skipped_reading)
    stats.records = len(records) + stats.skipped_reading.total
    processor = make_processor(config) if processor is None else processor
    media = [path for r in records for path in (*r.images, *r.videos, *r.audios)]
    settings = {**processor.settings(), "files": processor_files(processor.source)}
    key, parts = cache_key(resolve_data_files(config), media, config.raw.get("dataset_param", {}), settings)
    cache = PreprocessCache(config.basic.cache_dir or default_cache_dir(), key, parts)
    stats.cache_dir = str(cache.dir)
    start = time.perf_counter()
    with cache.lock():
        manifest = cache.manifest()
        if manifest is not None and config.basic.overwrite_cache and _is_local_rank0():
            cache.clear()
            manifest = None
        stats.from_cache = manifest is not None
        if manifest is None:
            manifest = _encode_all(records, config, processor, cache)
    for reason, where, detail in manifest["skipped"]:
        stats.skipped_encoding.add(reason, where, detail)
    stats.skipped_encoding.log("preprocessing", len(records))

    readers = [ShardReader(cache.dir / s["file"]) for s in manifest["shards"]]
    entries = []
    for shard, (reader, info) in enumerate(zip(readers, manifest["shards"])):
        if reader.count == 0:  # every record of the shard was skipped
            continue
        lengths = reader.shapes("input_ids")[:, 1]
        for local, (rec, length) in enumerate(zip(info["records"], lengths.tolist())):
            if seq_length is not None and length > seq_length:
                record = records[rec]
                light = DatasetSample(**reader.fields(local, skip=MEDIA_FIELDS), sample_id=record.source)
                cut = truncate_sample(
                    light, seq_length, len(record.messages) // 2, processor, config.basic.mask_history
                )
                if isinstance(cut, str):
                    stats.skipped_length.add("does not fit seq_length", record.source, f"{length} tokens: {cut}")
                    continue
                stats.truncated += 1
            entries.append((shard, local, rec))
    stats.skipped_length.log(f"cutting to seq_length {seq_length}", sum(len(s["records"]) for s in manifest["shards"]))
    if stats.truncated:
        logger.info("cut %d samples to seq_length %s (turns past the limit dropped)", stats.truncated, seq_length)
    if not entries:
        raise ValueError(f"{config.source}: no sample left (see the skip counts in the log)")
    stats.samples = len(entries)
    stats.seconds = time.perf_counter() - start
    logger.info(
        "%s: %d samples from %d records (%s in %.2f s, cache %s)",
        config.source, stats.samples, stats.records, "cache reused" if stats.from_cache else "preprocessed",
        stats.seconds, cache.dir,
    )
    return OmniDataset(config, processor, records, readers, entries, seq_length, stats)
