"""data.json parsing: MindSpeed-MM keys and defaults, warnings for unknown keys, errors that name file and key."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from omni_fast.data.config import DataConfig, load_data_config
from omni_fast.data.demo import demo_data_configs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "qwen2.5omni"

# The reference's examples/qwen2.5omni/data_7b.json, key for key.
DATA_7B = {
    "dataset_param": {
        "dataset_type": "huggingface",
        "preprocess_parameters": {
            "model_name_or_path": "./ckpt/hf_path/Qwen2.5-Omni-7B",
            "use_fast_tokenizer": True,
            "split_special_tokens": False,
            "image_max_pixels": 262144,
            "image_min_pixels": 0,
            "video_max_pixels": 16384,
            "video_min_pixels": 0,
            "video_fps": 2.0,
            "video_maxlen": 128,
        },
        "basic_parameters": {
            "template": "qwen2_omni",
            "dataset_dir": "./data",
            "dataset": "./data/mllm_format_llava_instruct_data.json",
            "cache_dir": "./data/cache_dir",
            "train_on_prompt": False,
            "mask_history": False,
            "preprocessing_batch_size": 1000,
            "preprocessing_num_workers": 16,
            "max_samples": None,
            "tool_format": None,
        },
        "attr": {
            "system": None,
            "images": None,
            "videos": "videos",
            "audios": "audios",
            "messages": "messages",
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "observation_tag": None,
            "function_tag": None,
            "system_tag": None,
        },
    },
    "dataloader_param": {
        "dataloader_mode": "sampler",
        "drop_last": True,
        "sampler_type": "BaseRandomBatchSampler",
        "collate_param": {"model_name": "qwen2vl", "ignore_pad_token_for_loss": True},
        "pin_memory": True,
        "shuffle": True,
    },
}


def _with(path: str, value, base: dict | None = None) -> dict:
    """A copy of ``base`` (DATA_7B) with the key at dotted ``path`` set to ``value``."""
    raw = copy.deepcopy(DATA_7B if base is None else base)
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


def test_reference_file_parses_with_its_values(caplog):
    with caplog.at_level(logging.WARNING, logger="omni_fast.data"):
        cfg = DataConfig.from_dict(DATA_7B, "data_7b.json")
    assert not caplog.records  # every key of the reference file is known
    assert cfg.dataset_type == "huggingface"
    assert cfg.preprocess.model_name_or_path == "./ckpt/hf_path/Qwen2.5-Omni-7B"
    assert (cfg.preprocess.image_max_pixels, cfg.preprocess.image_min_pixels) == (262144, 0)
    assert (cfg.preprocess.video_max_pixels, cfg.preprocess.video_fps, cfg.preprocess.video_maxlen) == (16384, 2.0, 128)
    assert cfg.preprocess.use_audio_in_video is False and cfg.preprocess.audio_sampling_rate == 16000
    assert cfg.basic.template == "qwen2_omni" and cfg.basic.dataset == ("./data/mllm_format_llava_instruct_data.json",)
    b = cfg.basic
    assert (b.cache_dir, b.preprocessing_num_workers, b.max_samples) == ("./data/cache_dir", 16, None)
    assert cfg.attr.images is None and cfg.attr.videos == "videos" and cfg.attr.messages == "messages"
    assert cfg.attr.system_tag is None and cfg.attr.formatting == "sharegpt"
    assert cfg.dataloader.drop_last is True and cfg.dataloader.collate_param["model_name"] == "qwen2vl"
    assert cfg.label_pad_ignored


def test_defaults_are_the_references():
    cfg = DataConfig.from_dict({"dataset_param": {"basic_parameters": {"dataset": "a.json"}}})
    p, b, a = cfg.preprocess, cfg.basic, cfg.attr
    assert (p.image_max_pixels, p.image_min_pixels, p.video_max_pixels, p.video_min_pixels) == (
        768 * 768, 32 * 32, 256 * 256, 16 * 16,
    )
    assert (p.video_fps, p.video_maxlen, p.use_audio_in_video, p.audio_sampling_rate) == (2.0, 128, False, 16000)
    assert (b.dataset_dir, b.train_on_prompt, b.mask_history) == ("data", False, False)
    assert b.preprocessing_batch_size == 1000
    assert (b.skip_bad_records, b.cache_media, b.overwrite_cache) == (False, True, False)
    # LLaVA's own keys are the attr defaults
    assert (a.messages, a.role_tag, a.content_tag, a.user_tag, a.assistant_tag) == (
        "conversations", "from", "value", "human", "gpt",
    )
    assert (a.observation_tag, a.function_tag, a.system_tag) == ("observation", "function_call", "system")


def test_comma_joined_datasets():
    cfg = DataConfig.from_dict(_with("dataset_param.basic_parameters.dataset", "./data/a.json,./data/b.jsonl"))
    assert cfg.basic.dataset == ("./data/a.json", "./data/b.jsonl")


@pytest.mark.parametrize("value", ["a.json, b.json", "a.json,,b.json", "a.json,", ""])
def test_dataset_list_with_spaces_or_empty_entries_is_rejected(value):
    with pytest.raises(ValueError, match=r"my\.json: dataset_param\.basic_parameters\.dataset"):
        DataConfig.from_dict(_with("dataset_param.basic_parameters.dataset", value), "my.json")


@pytest.mark.parametrize(
    ("path", "raw_key"),
    [
        ("datset", "datset"),
        ("dataset_param.extra", "dataset_param.extra"),
        ("dataset_param.basic_parameters.datset", "dataset_param.basic_parameters.datset"),
        ("dataset_param.preprocess_parameters.image_max_pixel", "dataset_param.preprocess_parameters.image_max_pixel"),
        ("dataset_param.attr.image", "dataset_param.attr.image"),
        ("dataloader_param.sampler", "dataloader_param.sampler"),
        ("dataloader_param.collate_param.pad_to", "dataloader_param.collate_param.pad_to"),
    ],
)
def test_unknown_keys_warn_with_their_path(caplog, path, raw_key):
    with caplog.at_level(logging.WARNING, logger="omni_fast.data"):
        cfg = DataConfig.from_dict(_with(path, 1), "mine.json")
    assert cfg.basic.dataset  # still parsed
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"mine.json: unknown key {raw_key} is ignored"]


def test_cutoff_len_is_rejected_as_in_the_reference():
    with pytest.raises(ValueError, match=r"my\.json: .*cutoff_len.*deprecated, please use `seq_length`"):
        DataConfig.from_dict(_with("dataset_param.basic_parameters.cutoff_len", 2048), "my.json")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("dataset_param.preprocess_parameters.image_max_pixels", "big", "must be an integer >= 0"),
        ("dataset_param.preprocess_parameters.video_fps", 0, "must be a number > 0"),
        ("dataset_param.preprocess_parameters.video_maxlen", 1.5, "must be an integer >= 1"),
        ("dataset_param.preprocess_parameters.use_audio_in_video", "yes", "must be true or false"),
        ("dataset_param.basic_parameters.max_samples", 0, "must be an integer >= 1"),
        ("dataset_param.basic_parameters.template", "qwen2_vl", "must be one of \\['qwen2_omni'\\]"),
        ("dataset_param.basic_parameters.train_on_prompt", 1, "must be true or false"),
        ("dataset_param.basic_parameters.packing", True, "not supported: sequence packing"),
        ("dataset_param.basic_parameters.streaming", True, "not supported"),
        ("dataset_param.attr.formatting", "alpaca", "must be one of \\['sharegpt'\\]"),
        ("dataset_param.attr.messages", None, "must be a non-empty string"),
        ("dataset_param.dataset_type", "webdataset", "must be one of \\['huggingface'\\]"),
        ("dataloader_param.dataloader_mode", "magic", "must be one of"),
        ("dataloader_param.collate_param", {"model_name": "llava"}, "must be one of \\['qwen2vl'\\]"),
    ],
)
def test_bad_values_name_the_file_and_key(path, value, message):
    with pytest.raises(ValueError, match=rf"^bad\.json: {path.replace('.', '[.]')}.*{message}"):
        DataConfig.from_dict(_with(path, value), "bad.json")


def test_off_options_are_accepted_when_off():
    raw = _with("dataset_param.basic_parameters.packing", False)
    raw["dataset_param"]["basic_parameters"].update(streaming=False, val_rate=None, neat_packing=False)
    DataConfig.from_dict(raw)


def test_contradictions():
    with pytest.raises(ValueError, match="image_min_pixels \\(5000\\) exceeds image_max_pixels \\(4000\\)"):
        raw = _with("dataset_param.preprocess_parameters.image_max_pixels", 4000)
        DataConfig.from_dict(_with("dataset_param.preprocess_parameters.image_min_pixels", 5000, raw))
    with pytest.raises(ValueError, match="attr.assistant_tag and user_tag are both 'user'"):
        DataConfig.from_dict(_with("dataset_param.attr.assistant_tag", "user"))
    with pytest.raises(ValueError, match="basic_parameters.dataset is required"):
        DataConfig.from_dict({"dataset_param": {}})
    with pytest.raises(ValueError, match="missing dataset_param"):
        DataConfig.from_dict({"dataloader_param": {}})


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "data.json"
    bad.write_text('{"dataset_param": {"basic_parameters": {"dataset": "a.json",}}}')
    with pytest.raises(ValueError, match=rf"{bad}: malformed JSON at line 1 column \d+"):
        load_data_config(bad)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'missing.json'}: cannot read"):
        load_data_config(tmp_path / "missing.json")


def test_digest_ignores_key_order_and_whitespace(tmp_path):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(DATA_7B))
    b.write_text(json.dumps(dict(reversed(list(DATA_7B.items()))), indent=3))
    assert load_data_config(a).digest == load_data_config(b).digest
    changed = _with("dataset_param.basic_parameters.mask_history", True)
    assert DataConfig.from_dict(changed).digest != load_data_config(a).digest


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("data*.json")))
def test_example_files_parse_without_warnings(caplog, name):
    with caplog.at_level(logging.WARNING, logger="omni_fast.data"):
        load_data_config(EXAMPLES / name)
    assert not caplog.records


def test_example_demo_configs_are_what_the_generator_writes():
    # examples/qwen2.5omni/data_demo*.json point at `python -m omni_fast.data.demo --out ./data/demo`
    expected = demo_data_configs("./data/demo")
    names = {"data.json": "data_demo.json", "data_mllm.json": "data_demo_mllm.json",
             "data_video_audio.json": "data_demo_video_audio.json"}
    for generated, example in names.items():
        assert json.loads((EXAMPLES / example).read_text()) == expected[generated], example
