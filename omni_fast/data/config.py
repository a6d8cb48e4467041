"""``data.json``: the MindSpeed-MM data configuration, parsed into frozen dataclasses.

The keys and defaults are MindSpeed-MM's (``ProcessorArguments``, ``DataArguments``, ``DatasetAttr`` and the
dataloader options of ``examples/qwen2.5omni/data_7b.json``)::

    {"dataset_param": {"dataset_type": "huggingface",
                       "preprocess_parameters": {...}, "basic_parameters": {...}, "attr": {...}},
     "dataloader_param": {...}}

Differences from the reference, all on purpose:

* An unknown key is a warning that names its path (``dataset_param.basic_parameters.datset``); the reference
  crashes in a dataclass constructor with a ``TypeError`` that does not say which file. A wrong type or value is a
  ``ValueError`` naming the file and the key path.
* ``basic_parameters.cutoff_len`` is rejected exactly as in the reference: the sequence length is the trainer's
  ``--seq-length`` flag.
* Options the reference has but that would change results here without effect (``packing``, ``streaming``,
  ``val_dataset`` ...) are accepted when off and rejected with a reason when on, so nothing is silently ignored.
* ``basic_parameters.skip_bad_records`` (ours, default false): a record that is malformed (bad roles, placeholder
  counts that disagree with its media lists, a missing or undecodable media file) is skipped and counted in the
  log instead of stopping the run with an error that names the file and record index.
* ``basic_parameters.cache_media`` (ours, default true): the preprocessing cache stores the decoded media arrays
  (pixel patches, mel features), so a second run decodes nothing. Set it to false for large image sets such as
  LLaVA-Instruct-150K (at ``image_max_pixels`` 262144 an image is ~6 MB of float32 patches): the cache then holds
  tokens and grids only and media are decoded again when a sample is used, as the reference does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "BasicParameters",
    "DataConfig",
    "DataloaderParameters",
    "DatasetAttr",
    "PreprocessParameters",
    "load_data_config",
]

logger = logging.getLogger("omni_fast.data")

TEMPLATES = ("qwen2_omni",)
DATASET_TYPES = ("huggingface",)


class _Invalid(ValueError):
    """A value failed its check; the message is completed with the file and key path by the caller."""


# ---------------------------------------------------------------------------------------------------- value checks


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"must be true or false, got {v!r}")
    return v


def _int(minimum: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise _Invalid(f"must be an integer >= {minimum}, got {v!r}")
        return v

    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def optional(v: Any) -> Any:
        return None if v is None else check(v)

    return optional


def _positive_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise _Invalid(f"must be a number > 0, got {v!r}")
    return float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _Invalid(f"must be a non-empty string, got {v!r}")
    return v


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise _Invalid(f"must be one of {list(choices)}, got {v!r}")
        return v

    return check


def _off(reason: str) -> Callable[[Any], Any]:
    """An option of the reference that is accepted only when it is off (false, null or 0)."""

    def check(v: Any) -> Any:
        if v not in (None, False, 0):
            raise _Invalid(f"is not supported: {reason} (remove it or set it to false/null)")
        return v

    return check


def _dataset_list(v: Any) -> tuple[str, ...]:
    # The reference splits on "," and hands every piece to datasets.load_dataset; an empty piece (a trailing
    # comma, or ", " with a space the guide warns about) would name a file that does not exist.
    names = tuple(_str(v).split(","))
    for name in names:
        if not name or name != name.strip():
            raise _Invalid(
                f"must be file paths joined by ',' without spaces or empty entries, got {v!r} (entry {name!r})"
            )
    return names


def _dict(v: Any) -> dict:
    if not isinstance(v, dict):
        raise _Invalid(f"must be an object, got {v!r}")
    return v


def _key(default: Any, check: Callable[[Any], Any], *, doc: str = "") -> Any:
    """A data.json key: its reference default, the check its value must pass, and what it does here."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"check": check, "doc": doc})
    return field(default=default, metadata={"check": check, "doc": doc})


def _parse_section(cls: type, raw: Any, path: str, file: str) -> Any:
    """Build dataclass ``cls`` from ``raw`` (a JSON object): check every known key, warn about unknown ones."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: {path} must be an object, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            logger.warning("%s: unknown key %s.%s is ignored", file, path, key)
            continue
        try:
            values[key] = known[key].metadata["check"](value)
        except _Invalid as e:
            raise ValueError(f"{file}: {path}.{key} {e}") from None
    return cls(**values)


# ---------------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class PreprocessParameters:
    """``dataset_param.preprocess_parameters`` (MindSpeed-MM ``ProcessorArguments``)."""

    model_name_or_path: str | None = _key(None, _optional(_str), doc="original HF dir: tokenizer, processor config")
    use_fast_tokenizer: bool = _key(True, _bool)
    split_special_tokens: bool = _key(False, _off("special tokens are always kept whole"))
    image_max_pixels: int = _key(768 * 768, _int(0))
    image_min_pixels: int = _key(32 * 32, _int(0))
    video_max_pixels: int = _key(256 * 256, _int(0))
    video_min_pixels: int = _key(16 * 16, _int(0))
    video_fps: float = _key(2.0, _positive_float)
    video_maxlen: int = _key(128, _int(1))
    use_audio_in_video: bool = _key(False, _bool)
    audio_sampling_rate: int = _key(16000, _int(1))
    # Reference keys for other models' processors; they do nothing for Qwen2.5-Omni.
    image_resolution: int | None = _key(None, _optional(_int(1)), doc="unused by qwen2_omni (max_pixels rules)")
    video_resolution: int | None = _key(None, _optional(_int(1)), doc="unused by qwen2_omni (max_pixels rules)")
    image_do_pan_and_scan: bool = _key(False, _off("pan-and-scan is a Gemma3 image option"))
    crop_to_patches: bool = _key(False, _off("crop-to-patches is an InternVL image option"))
    trust_remote_code: bool = _key(False, _bool, doc="no remote code is ever run; accepted for compatibility")
    fix_mistral_regex: bool = _key(False, _off("a Mistral tokenizer option"))




@dataclass(frozen=True)
class BasicParameters:
    """``dataset_param.basic_parameters`` (MindSpeed-MM ``DataArguments``) plus ``skip_bad_records``."""

    template: str = _key("qwen2_omni", _one_of(*TEMPLATES))
    dataset_dir: str = _key("data", _str, doc="media (and relative dataset) paths are looked up here first")
    dataset: tuple[str, ...] = _key(None, _dataset_list, doc="JSON / JSONL files joined by ','")
    cache_dir: str | None = _key(None, _optional(_str), doc="preprocessing cache; do not share one across nodes")
    train_on_prompt: bool = _key(False, _bool)
    mask_history: bool = _key(False, _bool)
    preprocessing_batch_size: int = _key(1000, _int(1), doc="records per cache shard")
    preprocessing_num_workers: int | None = _key(None, _optional(_int(1)), doc="processes that preprocess shards")
    max_samples: int | None = _key(None, _optional(_int(1)), doc="first N records of the joined files")
    overwrite_cache: bool = _key(False, _bool, doc="rebuild the preprocessing cache")
    skip_bad_records: bool = _key(False, _bool, doc="skip (and count) malformed records instead of failing")
    cache_media: bool = _key(True, _bool, doc="store decoded media in the cache (false: decode again on use)")
    tool_format: str | None = _key(None, _off("tool calls are not supported by this trainer"))
    enable_thinking: bool = _key(True, _bool, doc="no effect for qwen2_omni (no thinking mode)")
    streaming: bool = _key(False, _off("the records are read eagerly and validated before training"))
    preprocess_on_fly: bool = _key(False, _off("samples are preprocessed once and cached"))
    async_preprocess: bool = _key(False, _off("samples are preprocessed once and cached"))
    async_preprocess_buffer_size: int | None = _key(None, _optional(_int(0)), doc="unused (no async preprocessing)")
    val_dataset: str | None = _key(None, _off("no validation set is evaluated"))
    val_max_samples: int | None = _key(None, _off("no validation set is evaluated"))
    val_rate: float | None = _key(None, _off("no validation set is evaluated"))
    packing: bool | None = _key(None, _off("sequence packing is not implemented"))
    neat_packing: bool = _key(False, _off("sequence packing is not implemented"))
    use_pmcc_data: bool = _key(False, _off("PMCC data is not supported"))




@dataclass(frozen=True)
class DatasetAttr:
    """``dataset_param.attr`` (MindSpeed-MM ``DatasetAttr``): which record keys and role tags hold what.

    A column name of ``None`` means the records have no such column (e.g. ``images: null`` ignores an ``images``
    key). A tag of ``None`` means that role is not accepted.
    """

    system: str | None = _key(None, _optional(_str), doc="record key of the system prompt")
    images: str | None = _key(None, _optional(_str))
    videos: str | None = _key(None, _optional(_str))
    audios: str | None = _key(None, _optional(_str))
    messages: str = _key("conversations", _str)
    role_tag: str = _key("from", _str)
    content_tag: str = _key("value", _str)
    user_tag: str = _key("human", _str)
    assistant_tag: str = _key("gpt", _str)
    observation_tag: str | None = _key("observation", _optional(_str))
    function_tag: str | None = _key("function_call", _optional(_str))
    system_tag: str | None = _key("system", _optional(_str), doc="role tag of a leading system message")
    formatting: str = _key("sharegpt", _one_of("sharegpt"))
    ranking: bool = _key(False, _off("pairwise (ranking) data is for reward modelling"))




@dataclass(frozen=True)
class DataloaderParameters:
    """``dataloader_param``. ``batch_size``, ``num_workers`` and ``seed`` always come from the command line."""

    dataloader_mode: str = _key("sampler", _one_of("sampler", "base", "variable"))
    sampler_type: str | None = _key("BaseRandomBatchSampler", _optional(_str))
    drop_last: bool = _key(True, _bool)
    shuffle: bool = _key(True, _bool)
    pin_memory: bool = _key(True, _bool, doc="no effect on CPU")
    collate_param: dict = _key(
        {"model_name": "qwen2vl", "ignore_pad_token_for_loss": True}, _dict, doc="model_name, ignore_pad_token_for_loss"
    )
    batch_size: int | None = _key(None, _optional(_int(1)), doc="overridden by --micro-batch-size")
    num_workers: int | None = _key(None, _optional(_int(0)), doc="overridden by --num-workers")
    seed: int | None = _key(None, _optional(_int(0)), doc="overridden by --seed")
    prefetch_factor: int | None = _key(None, _optional(_int(1)))
    persistent_workers: bool | None = _key(None, _optional(_bool))
    data_sharding: bool = _key(False, _bool)
    group_frame: bool = _key(False, _off("frame grouping is for video generation models"))
    group_resolution: bool = _key(False, _off("resolution grouping is for video generation models"))
    group_data: bool = _key(False, _off("length grouping is not implemented"))



_COLLATE_KEYS = {"model_name": ("qwen2vl",), "ignore_pad_token_for_loss": (True, False)}


# ---------------------------------------------------------------------------------------------------- whole file


@dataclass(frozen=True)
class DataConfig:
    """A parsed ``data.json``. ``raw`` is the file's JSON; ``source`` names where it came from (for messages)."""

    dataset_type: str
    preprocess: PreprocessParameters
    basic: BasicParameters
    attr: DatasetAttr
    dataloader: DataloaderParameters
    raw: dict = field(repr=False)
    source: str = "data.json"

    @classmethod
    def from_dict(cls, raw: Any, source: str = "data.json") -> DataConfig:
        """Check ``raw`` (the JSON object of a data.json) and build the config; ``source`` names it in errors."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: the top level must be an object, got {type(raw).__name__}")
        for key in raw:
            if key not in ("dataset_param", "dataloader_param"):
                logger.warning("%s: unknown key %s is ignored", source, key)
        if "dataset_param" not in raw:
            raise ValueError(f"{source}: missing dataset_param")
        dp = raw["dataset_param"]
        if not isinstance(dp, dict):
            raise ValueError(f"{source}: dataset_param must be an object, got {type(dp).__name__}")
        for key in dp:
            if key not in ("dataset_type", "preprocess_parameters", "basic_parameters", "attr"):
                logger.warning("%s: unknown key dataset_param.%s is ignored", source, key)
        dataset_type = dp.get("dataset_type", "huggingface")
        if dataset_type not in DATASET_TYPES:
            raise ValueError(
                f"{source}: dataset_param.dataset_type must be one of {list(DATASET_TYPES)} "
                f"(the Qwen2.5-Omni loader), got {dataset_type!r}"
            )
        basic_raw = dp.get("basic_parameters")
        if isinstance(basic_raw, dict) and "cutoff_len" in basic_raw:
            # the reference's own words: get_qwen2vl_dataset raises this
            raise ValueError(
                f"{source}: dataset_param.basic_parameters.cutoff_len: `cutoff_len` is deprecated, please use "
                "`seq_length` instead (the sequence length is the --seq-length flag)"
            )
        basic = _parse_section(BasicParameters, basic_raw, "dataset_param.basic_parameters", source)
        if basic.dataset is None:
            raise ValueError(f"{source}: dataset_param.basic_parameters.dataset is required (the data files)")
        preprocess = _parse_section(
            PreprocessParameters, dp.get("preprocess_parameters"), "dataset_param.preprocess_parameters", source
        )
        for kind in ("image", "video"):
            lo, hi = getattr(preprocess, f"{kind}_min_pixels"), getattr(preprocess, f"{kind}_max_pixels")
            if lo > hi:
                raise ValueError(
                    f"{source}: dataset_param.preprocess_parameters.{kind}_min_pixels ({lo}) exceeds "
                    f"{kind}_max_pixels ({hi})"
                )
        attr = _parse_section(DatasetAttr, dp.get("attr"), "dataset_param.attr", source)
        tags = [
            (name, getattr(attr, name))
            for name in ("user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
            if getattr(attr, name) is not None
        ]
        seen: dict[str, str] = {}
        for name, tag in tags:
            if tag in seen:
                raise ValueError(f"{source}: dataset_param.attr.{name} and {seen[tag]} are both {tag!r}")
            seen[tag] = name
        dataloader = _parse_section(
            DataloaderParameters, raw.get("dataloader_param"), "dataloader_param", source
        )
        for key, value in dataloader.collate_param.items():
            if key not in _COLLATE_KEYS:
                logger.warning("%s: unknown key dataloader_param.collate_param.%s is ignored", source, key)
            elif value not in _COLLATE_KEYS[key]:
                raise ValueError(
                    f"{source}: dataloader_param.collate_param.{key} must be one of {list(_COLLATE_KEYS[key])}, "
                    f"got {value!r}"
                )
        return cls(dataset_type, preprocess, basic, attr, dataloader, raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> DataConfig:
        """Read and check a data.json file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"{path}: cannot read the data config ({e.strerror or e})") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_dict(raw, str(path))

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of the file's content (key order and whitespace do not matter)."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def label_pad_ignored(self) -> bool:
        """``collate_param.ignore_pad_token_for_loss`` (default true): pad labels are -100, else the pad id."""
        return bool(self.dataloader.collate_param.get("ignore_pad_token_for_loss", True))


def load_data_config(path: str | Path) -> DataConfig:
    """Read and check a ``data.json`` (MindSpeed-MM keys); see :class:`DataConfig`."""
    return DataConfig.from_file(path)
