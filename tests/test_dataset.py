"""Reading records (formats, attr remapping, joined files, media paths), bad input, the cache, truncation."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from demo_data import LLAMAFACTORY_DEMO, config_for, demo_processor, demo_raw, demo_root

from omni_fast.data.cache import PreprocessCache, ShardReader, read_shard, write_shard
from omni_fast.data.config import DataConfig
from omni_fast.data.dataset import (
    DataError,
    build_dataset,
    encode_record,
    infer_seqlen,
    read_records,
    truncate_sample,
)
from omni_fast.data.template import IGNORE_INDEX, EncodedSample
from omni_fast.ops.rope_index import get_rope_index_reference

LF_ATTR = {"messages": "messages", "role_tag": "role", "content_tag": "content", "user_tag": "user",
           "assistant_tag": "assistant"}


def _turns(*texts: str) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


def _lf_config(dataset: str, attr: dict, **preprocess) -> DataConfig:
    return DataConfig.from_dict(
        {
            "dataset_param": {
                "preprocess_parameters": {"model_name_or_path": str(demo_root() / "tiny_processor"), **preprocess},
                "basic_parameters": {"dataset_dir": str(LLAMAFACTORY_DEMO), "dataset": dataset},
                "attr": {**LF_ATTR, **attr},
            }
        }
    )


# ---------------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    ("name", "attr", "counts"),
    [
        ("mllm_demo.json", {"images": "images"}, (6, "images")),
        ("mllm_video_demo.json", {"videos": "videos"}, (3, "videos")),
        ("mllm_audio_demo.json", {"audios": "audios"}, (3, "audios")),
        ("mllm_video_audio_demo.json", {"videos": "videos", "audios": "audios"}, (3, "videos")),
    ],
)
def test_llamafactory_demo_files_are_read_and_checked(name, attr, counts):
    records = read_records(_lf_config(name, attr, use_audio_in_video=name == "mllm_video_audio_demo.json"))
    n, kind = counts
    assert len(records) == n
    raw = json.loads((LLAMAFACTORY_DEMO / name).read_text())
    for i, (rec, r) in enumerate(zip(records, raw)):
        assert rec.source == f"{LLAMAFACTORY_DEMO / name}#{i}"
        assert [m["content"] for m in rec.messages] == [m["content"] for m in r["messages"]]
        assert getattr(rec, kind) == tuple(str(LLAMAFACTORY_DEMO / p) for p in r[kind])
        assert all(os.path.isfile(p) for p in (*rec.images, *rec.videos, *rec.audios))
        assert rec.use_audio_in_video == (name == "mllm_video_audio_demo.json")


def test_llamafactory_video_audio_demo_encodes_audio_in_video(tmp_path):
    cfg = _lf_config("mllm_video_audio_demo.json", {"videos": "videos", "audios": "audios"},
                     use_audio_in_video=True, video_max_pixels=16384, video_min_pixels=0)
    ids = demo_processor().ids
    for rec in read_records(cfg):
        s = encode_record(rec, demo_processor(), cfg)
        assert s.use_audio_in_video and s.video_grid_thw.shape == (1, 3) and s.input_features.shape[0] == 1
        assert (s.input_ids == ids["video"]).sum() == s.video_grid_thw.prod() // 4
        assert (s.input_ids == ids["audio"]).sum() == s.audio_token_counts[0] > 0
        # one block: <|vision_bos|><|audio_bos|> ... <|audio_eos|><|vision_eos|>
        bos = np.flatnonzero(s.input_ids == ids["vision_bos"])
        assert bos.size == 1 and s.input_ids[bos[0] + 1] == ids["audio_bos"]


def test_joined_files_and_max_samples_over_the_joined_set(tmp_path):
    a = [{"messages": _turns(f"a{i}?", f"a{i}.")} for i in range(3)]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"messages": _turns(f"b{i}?", f"b{i}.")}) for i in range(3)))
    cfg = config_for(tmp_path, {"a.json": a}, dataset="a.json,b.jsonl", max_samples=4)
    records = read_records(cfg)
    assert [r.messages[0]["content"] for r in records] == ["a0?", "a1?", "a2?", "b0?"]
    assert records[3].source == f"{tmp_path / 'b.jsonl'}#0"
    cfg = config_for(tmp_path, {"a.json": a}, dataset="a.json,b.jsonl")
    assert len(read_records(cfg)) == 6


def test_relative_data_file_resolution(tmp_path, monkeypatch):
    recs = [{"messages": _turns("q", "a")}]
    sub = tmp_path / "data"
    sub.mkdir()
    (sub / "x.json").write_text(json.dumps(recs))
    monkeypatch.chdir(tmp_path)
    raw = demo_raw()
    b = raw["dataset_param"]["basic_parameters"]
    for dataset_dir, dataset in (("./data", "x.json"), ("./data", "./data/x.json"), ("elsewhere", "data/x.json")):
        b.update(dataset_dir=dataset_dir, dataset=dataset)
        assert len(read_records(DataConfig.from_dict(raw))) == 1
    b.update(dataset_dir="./data", dataset="y.json")
    with pytest.raises(ValueError, match=r"data\.json: dataset_param\.basic_parameters\.dataset: data file 'y\.json' "
                                         r"not found \(looked for './data/y\.json' and 'y\.json'"):
        read_records(DataConfig.from_dict(raw))


def test_attr_remaps_keys_and_role_tags(tmp_path):
    img = str(demo_root() / "media" / "red_circle.png")
    llava = [
        {"id": "1", "image": img, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "A circle."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    raw = demo_raw()
    raw["dataset_param"]["attr"] = {"images": "image"}  # everything else: the reference defaults (LLaVA's keys)
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    raw["dataset_param"]["basic_parameters"].update(dataset_dir=str(tmp_path), dataset="llava.json")
    records = read_records(DataConfig.from_dict(raw))
    assert records[0].images == (img,) and records[1].images == ()
    assert records[0].messages == ({"role": "user", "content": "<image>\nWhat?"},
                                   {"role": "assistant", "content": "A circle."})

    custom = [
        {"dialog": [{"who": "Q", "text": "one"}, {"who": "A", "text": "two"}], "sys": "Be brief.", "pics": []},
        {"dialog": [{"who": "S", "text": "Leading system wins."}, {"who": "Q", "text": "x"},
                    {"who": "A", "text": "y"}], "sys": "ignored"},
    ]
    (tmp_path / "custom.json").write_text(json.dumps(custom))
    raw["dataset_param"]["attr"] = {"messages": "dialog", "role_tag": "who", "content_tag": "text", "user_tag": "Q",
                                    "assistant_tag": "A", "system_tag": "S", "system": "sys", "images": "pics"}
    raw["dataset_param"]["basic_parameters"]["dataset"] = "custom.json"
    records = read_records(DataConfig.from_dict(raw))
    assert records[0].system == "Be brief." and records[0].messages[1] == {"role": "assistant", "content": "two"}
    assert records[1].system == "Leading system wins." and len(records[1].messages) == 2


def test_media_paths_and_text_only_records_mix(tmp_path, monkeypatch):
    media = tmp_path / "media"
    shutil.copytree(demo_root() / "media", media)
    absolute = str(demo_root() / "media" / "green_square.png")
    records = [
        {"images": ["media/red_circle.png"], "messages": _turns("<image>?", "red")},
        {"images": [absolute], "messages": _turns("<image>?", "green")},
        {"messages": _turns("text only", "ok")},
        {"images": [], "messages": _turns("empty list", "ok")},
        {"images": None, "messages": _turns("null", "ok")},
    ]
    cfg = config_for(tmp_path, {"mixed.json": records})
    out = read_records(cfg)
    assert out[0].images == (str(tmp_path / "media/red_circle.png"),)
    assert out[1].images == (absolute,)
    assert [r.images for r in out[2:]] == [(), (), ()]
    # the reference's fallback: a path that is not under dataset_dir is used as given (here: from the cwd)
    monkeypatch.chdir(tmp_path)
    records[0]["images"] = ["./media/blue_triangle.png"]
    raw = demo_raw()
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    basic = raw["dataset_param"]["basic_parameters"]
    basic.update(dataset_dir=str(tmp_path / "nowhere"), dataset=str(tmp_path / "mixed.json"))
    assert read_records(DataConfig.from_dict(raw))[0].images == ("./media/blue_triangle.png",)


def test_use_audio_in_video_per_run_and_per_record(tmp_path):
    m = demo_root() / "media"
    va = {"videos": [str(m / "square_moves.mp4")], "audios": [str(m / "square_moves.wav")]}
    records = [
        {"messages": _turns("<video><audio>?", "a"), **va},
        {"messages": _turns("<video><audio>?", "b"), **va, "use_audio_in_video": False},
        {"messages": _turns("<audio>?", "c"), "audios": [str(m / "low_tone.wav")], "use_audio_in_video": True},
        {"messages": _turns("<video>?", "d"), "videos": va["videos"]},  # the video's own sound track
    ]
    on = read_records(config_for(tmp_path, {"r.json": records}))  # the demo data.json sets it true
    assert [r.use_audio_in_video for r in on] == [True, False, False, True]
    raw = demo_raw()
    raw["dataset_param"]["preprocess_parameters"]["use_audio_in_video"] = False
    raw["dataset_param"]["basic_parameters"].update(dataset_dir=str(tmp_path), dataset="r.json")
    records[3]["use_audio_in_video"] = True
    (tmp_path / "r.json").write_text(json.dumps(records))
    off = read_records(DataConfig.from_dict(raw))
    assert [r.use_audio_in_video for r in off] == [False, False, False, True]
    # and the encoder follows the record: an interleaved block only where the record asked for it
    ds = build_dataset(DataConfig.from_dict(raw), None, processor=demo_processor())
    ids = demo_processor().ids
    blocks = [bool(((s.input_ids[:-1] == ids["vision_bos"]) & (s.input_ids[1:] == ids["audio_bos"])).any())
              for s in (ds[i] for i in range(len(ds)))]
    assert blocks == [False, False, False, True]


# ---------------------------------------------------------------------------------------------------- bad input

MISSING = "media/not_there.png"
BAD_RECORDS = {
    "unknown role": {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
    "bad role order": {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
    "odd count": {"messages": [{"role": "user", "content": "q"}]},
    "placeholder count mismatch": {"messages": _turns("<image><image>?", "a"), "images": ["media/red_circle.png"]},
    "missing media file": {"messages": _turns("<image>?", "a"), "images": [MISSING]},
    "malformed record": {"conversations": _turns("q", "a")},
    "audio in video mismatch": {"messages": _turns("<audio><video>?", "a"), "videos": ["media/square_moves.mp4"],
                                "audios": ["media/square_moves.wav"]},
    "unsupported role": {"messages": [{"role": "user", "content": "q"}, {"role": "function", "content": "f()"}]},
}
EXPECTED = {
    "unknown role": r"message 1 has unknown role 'robot'",
    "bad role order": r"message 0 has role 'assistant' where 'user' is expected",
    "odd count": r"1 non-system messages: the conversation must end with an answer",
    "placeholder count mismatch": r"2 <image> placeholder\(s\) in the messages but 1 images",
    "missing media file": r"image file 'media/not_there\.png' not found",
    "malformed record": r"no 'messages' key \(it has 'conversations': set dataset_param\.attr\.messages\)",
    "audio in video mismatch": r"each <video> must be followed by its <audio>",
    "unsupported role": r"tool turn",
}


def _bad_config(tmp_path: Path, bad: dict, **basic) -> DataConfig:
    shutil.copytree(demo_root() / "media", tmp_path / "media", dirs_exist_ok=True)
    good = {"messages": _turns("<image>?", "red"), "images": ["media/red_circle.png"]}
    return config_for(tmp_path, {"recs.json": [good, good, bad, good]}, **basic)


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_records_name_file_and_index(tmp_path, case):
    cfg = _bad_config(tmp_path, BAD_RECORDS[case])
    if case == "unsupported role":
        raw = json.loads(json.dumps(cfg.raw))
        raw["dataset_param"]["attr"]["function_tag"] = "function"
        cfg = DataConfig.from_dict(raw, cfg.source)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'recs.json'}#2: .*{EXPECTED[case]}") as err:
        read_records(cfg)
    assert err.value.where == f"{tmp_path / 'recs.json'}#2"


def test_placeholder_hint_when_attr_does_not_map_the_media_key(tmp_path):
    cfg = _bad_config(tmp_path, {"messages": _turns("<image>?", "a"), "images": ["media/red_circle.png"]})
    raw = json.loads(json.dumps(cfg.raw))
    raw["dataset_param"]["attr"]["images"] = None  # the reference data_7b.json's setting, with image data
    with pytest.raises(DataError, match=r"#0: .*but 0 images; the record has a 'images' key but "
                                        r"dataset_param\.attr\.images is None"):
        read_records(DataConfig.from_dict(raw, cfg.source))


def test_malformed_json_names_file_and_position(tmp_path):
    (tmp_path / "broken.json").write_text('[\n  {"messages": []},\n  {"messages": [}\n]')
    cfg = config_for(tmp_path, {}, dataset="broken.json")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'broken.json'}: malformed JSON at line 3 column 17"):
        read_records(cfg)
    (tmp_path / "broken.jsonl").write_text('{"messages": []}\n{"messages": [1,]}\n')
    cfg = config_for(tmp_path, {}, dataset="broken.jsonl")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'broken.jsonl'}: malformed JSON at line 2 column 17"):
        read_records(cfg)


def test_skip_bad_records_counts_them(tmp_path, caplog):
    shutil.copytree(demo_root() / "media", tmp_path / "media")
    good = {"messages": _turns("<image>?", "red"), "images": ["media/red_circle.png"]}
    records = [good, BAD_RECORDS["unknown role"], good, BAD_RECORDS["missing media file"],
               BAD_RECORDS["placeholder count mismatch"], BAD_RECORDS["unknown role"], good]
    cfg = config_for(tmp_path, {"recs.json": records}, skip_bad_records=True)
    with caplog.at_level(logging.WARNING, logger="omni_fast.data"):
        ds = build_dataset(cfg, 4096, processor=demo_processor())
    assert len(ds) == 3 and [ds.sample_id(i).rsplit("#", 1)[1] for i in range(3)] == ["0", "2", "6"]
    assert dict(ds.stats.skipped_reading.counts) == {
        "unknown role": 2, "missing media file": 1, "placeholder count mismatch": 1,
    }
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "reading records: skipped 4 of 7 records" in log and "2 x unknown role" in log
    assert f"{tmp_path / 'recs.json'}#1: message 1 has unknown role 'robot'" in log


def test_undecodable_media_fails_or_is_skipped_at_preprocessing(tmp_path, caplog):
    shutil.copytree(demo_root() / "media", tmp_path / "media")
    (tmp_path / "media" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    good = {"messages": _turns("<image>?", "red"), "images": ["media/red_circle.png"]}
    bad = {"messages": _turns("<image>?", "?"), "images": ["media/broken.png"]}
    cfg = config_for(tmp_path, {"recs.json": [good, bad, good]})
    with pytest.raises(DataError, match=rf"^{tmp_path / 'recs.json'}#1: .*broken\.png: cannot decode image") as err:
        build_dataset(cfg, 4096, processor=demo_processor())
    assert err.value.reason == "undecodable media"
    # one record per shard: the bad record's shard ends up empty
    cfg = config_for(tmp_path, {"recs.json": [good, bad, good]}, skip_bad_records=True, preprocessing_batch_size=1)
    with caplog.at_level(logging.WARNING, logger="omni_fast.data"):
        ds = build_dataset(cfg, 4096, processor=demo_processor())
    assert len(ds) == 2 and dict(ds.stats.skipped_encoding.counts) == {"undecodable media": 1}
    assert "preprocessing: skipped 1 of 3 records" in caplog.text
    # the skip count is kept with the cache and logged again when it is reused
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="omni_fast.data"):
        again = build_dataset(cfg, 4096, processor=demo_processor())
    assert again.stats.from_cache and "preprocessing: skipped 1 of 3 records" in caplog.text


# ---------------------------------------------------------------------------------------------------- cache


def _same(a: EncodedSample, b: EncodedSample) -> None:
    for f in dataclasses.fields(EncodedSample):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y), f.name
        else:
            assert x == y, f.name


def test_cache_is_reused_and_keyed_by_data_and_config(tmp_path):
    cfg = DataConfig.from_file(demo_root() / "data.json")
    raw = json.loads(json.dumps(cfg.raw))
    raw["dataset_param"]["basic_parameters"]["cache_dir"] = str(tmp_path / "cache")
    cfg = DataConfig.from_dict(raw)
    first = build_dataset(cfg, 4096, processor=demo_processor())
    second = build_dataset(cfg, 4096, processor=demo_processor())
    assert not first.stats.from_cache and second.stats.from_cache and len(first) == len(second) == 13
    for i in range(len(first)):
        _same(first[i], second[i])
        _same(first[i], encode_record(first.records[i], demo_processor(), cfg))  # the cache changes nothing
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one key directory + its lock file

    # data.json content that changes samples -> a new key; key order / cache location knobs do not
    raw["dataset_param"]["basic_parameters"]["train_on_prompt"] = True
    assert not build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor()).stats.from_cache
    raw["dataset_param"]["basic_parameters"]["preprocessing_num_workers"] = 3
    assert build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor()).stats.from_cache
    # a data file touched -> a new key
    data_file = demo_root() / "audio_demo.json"
    st = data_file.stat()
    os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not build_dataset(cfg, 4096, processor=demo_processor()).stats.from_cache
    # overwrite_cache rebuilds in place
    raw["dataset_param"]["basic_parameters"]["overwrite_cache"] = True
    assert not build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor()).stats.from_cache


def test_an_interrupted_build_resumes_from_its_shards(tmp_path):
    raw = demo_raw()
    raw["dataset_param"]["basic_parameters"].update(cache_dir=str(tmp_path / "cache"), preprocessing_batch_size=4)
    first = build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor())
    cache = Path(first.stats.cache_dir)
    (cache / "manifest.json").unlink()  # as if the run died before the manifest
    (cache / "shard-00002.safetensors").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*")}
    again = build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor())
    assert not again.stats.from_cache and (cache / "shard-00002.safetensors").is_file()
    assert {name: (cache / name).stat().st_mtime_ns for name in kept} == kept  # reused, not rewritten
    for i in range(len(first)):
        _same(first[i], again[i])
    # another shard size (not part of the key): the old shards cover other records and are not reused
    (cache / "manifest.json").unlink()
    raw["dataset_param"]["basic_parameters"]["preprocessing_batch_size"] = 5
    third = build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor())
    assert [s["first"] for s in json.loads((cache / "manifest.json").read_text())["shards"]] == [0, 5, 10]
    for i in range(len(first)):
        _same(first[i], third[i])


def test_cache_without_media_decodes_again_on_use(tmp_path):
    raw = demo_raw()
    raw["dataset_param"]["basic_parameters"]["cache_dir"] = str(tmp_path / "cache")
    full = build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor())
    raw["dataset_param"]["basic_parameters"]["cache_media"] = False
    lean = build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor())
    assert not lean.stats.from_cache
    for i in range(len(full)):
        _same(full[i], lean[i])
    assert lean.get(0, media=False).pixel_values is None
    sizes = {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (tmp_path / "cache").iterdir()
             if d.is_dir()}
    assert len(sizes) == 2 and min(sizes.values()) * 10 < max(sizes.values())


@pytest.mark.slow  # each spawned worker imports transformers and MindSpore (~10 s on the shared 2-core VM)
def test_worker_processes_give_the_serial_result(tmp_path):
    raw = demo_raw()
    raw["dataset_param"]["basic_parameters"].update(
        cache_dir=str(tmp_path / "pool"), preprocessing_batch_size=4, preprocessing_num_workers=2
    )
    pooled = build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor())
    raw["dataset_param"]["basic_parameters"].update(cache_dir=str(tmp_path / "serial"), preprocessing_num_workers=1)
    serial = build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor())
    assert len(list(Path(pooled.stats.cache_dir).glob("shard-*.safetensors"))) == 4  # 13 records, 4 per shard
    assert len(pooled) == len(serial) == 13
    for i in range(len(serial)):
        _same(pooled[i], serial[i])


def _build_in_child(raw: dict, queue) -> None:
    ds = build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor())
    queue.put((ds.stats.from_cache, [ds[i].input_ids.tolist() for i in range(len(ds))]))


def test_two_processes_building_one_cache(tmp_path):
    demo_processor()  # built before forking, so the children share it
    raw = demo_raw()
    raw["dataset_param"]["basic_parameters"]["cache_dir"] = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(raw, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(r[0] for r in results) == [False, True]  # one built it, the other waited and reused it
    assert results[0][1] == results[1][1]
    ds = build_dataset(DataConfig.from_dict(raw), 4096, processor=demo_processor())
    assert ds.stats.from_cache and [ds[i].input_ids.tolist() for i in range(len(ds))] == results[0][1]
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*.tmp")]
    assert not leftovers


@dataclasses.dataclass
class _Row:
    values: np.ndarray
    tag: str


def _hammer_shard(path: str, seed: int, rounds: int) -> None:
    rows = [_Row(np.arange(1000 + i, dtype=np.float32), f"r{i}") for i in range(50)]
    for _ in range(rounds):
        write_shard(Path(path), rows, {"writer": "any"})


def test_concurrent_writes_of_one_shard_leave_a_valid_file(tmp_path):
    # no lock here: the atomic replace alone must keep every state of the file valid
    path = tmp_path / "shard-00000.safetensors"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer_shard, args=(str(path), s, 15)) for s in range(2)]
    for p in procs:
        p.start()
    seen = 0
    while any(p.is_alive() for p in procs):
        if path.exists():
            rows = read_shard(path, _Row)  # never a torn file
            assert len(rows) == 50 and rows[7].tag == "r7"
            seen += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    rows = read_shard(path, _Row)
    assert [r.tag for r in rows] == [f"r{i}" for i in range(50)]
    assert all(np.array_equal(r.values, np.arange(1000 + i, dtype=np.float32)) for i, r in enumerate(rows))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_shard_round_trip_keeps_types_and_none():
    rng = np.random.default_rng(0)
    samples = []
    for i in range(5):
        s = EncodedSample(rng.integers(0, 9, i + 1), rng.integers(0, 9, i + 1), np.ones(i + 1, np.int64))
        if i % 2:
            s.pixel_values = rng.standard_normal((4 * i, 1176)).astype(np.float32)
            s.image_grid_thw = np.array([[1, 2, 2 * i]])
            s.image_token_counts = [i]
        s.use_audio_in_video = bool(i == 3)
        s.audio_seconds_dropped = 0.5 * i
        samples.append(s)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"omni_fast_shard_{os.getpid()}.safetensors"
    try:
        write_shard(path, samples, {})
        back = read_shard(path, EncodedSample)
        reader = ShardReader(path)
        assert reader.shapes("input_ids")[:, 1].tolist() == [1, 2, 3, 4, 5]
    finally:
        path.unlink()
    for a, b in zip(samples, back):
        _same(a, b)
        assert type(b.use_audio_in_video) is bool and type(b.audio_seconds_dropped) is float
    assert PreprocessCache(path.parent, "k" * 64, {}).manifest() is None


# ---------------------------------------------------------------------------------------------------- truncation


def _encode(messages, images=()) -> tuple[EncodedSample, int]:
    from omni_fast.data.template import encode_sample

    s = encode_sample(list(messages), list(images), [], [], demo_processor())
    return s, sum(m["role"] == "user" for m in messages)


def _check_consistent(s: EncodedSample) -> None:
    """Token runs and media arrays agree (what the model's placeholder checks and the rope index need)."""
    ids = demo_processor().ids
    grids = s.image_grid_thw
    n_img = 0 if grids is None else int((grids.prod(1) // 4).sum())
    assert (s.input_ids == ids["image"]).sum() == n_img
    assert (s.pixel_values is None) == (grids is None)
    if grids is not None:
        assert s.pixel_values.shape[0] == grids.prod(1).sum()
        assert s.image_token_counts == (grids.prod(1) // 4).tolist()
    get_rope_index_reference(s.input_ids[None], grids, None, image_token_id=ids["image"],
                             video_token_id=ids["video"], audio_token_id=ids["audio"],
                             vision_start_token_id=ids["vision_bos"], audio_start_token_id=ids["audio_bos"])


def _lf_reference(messages, seq_length: int, mask_history: bool) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's _encode_data_example, on (source, target) pairs taken from encodings of prefixes."""
    pairs, prev = [], 0
    for k in range(2, len(messages) + 1, 2):
        s, _ = _encode(messages[:k])
        ids, labels = s.input_ids[prev:].tolist(), s.labels[prev:].tolist()
        cut = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
        pairs.append((ids[:cut], ids[cut:]))
        prev = s.input_ids.size
    input_ids, labels, total = [], [], 0
    if mask_history:
        pairs = pairs[::-1]
    for turn, (src, tgt) in enumerate(pairs):
        if total >= seq_length:
            break
        s_len, t_len = infer_seqlen(len(src), len(tgt), seq_length - total)
        src, tgt = src[:s_len], tgt[:t_len]
        total += s_len + t_len
        tgt_label = [IGNORE_INDEX] * t_len if mask_history and turn != 0 else tgt
        if mask_history:
            input_ids, labels = src + tgt + input_ids, [IGNORE_INDEX] * s_len + tgt_label + labels
        else:
            input_ids, labels = input_ids + src + tgt, labels + [IGNORE_INDEX] * s_len + tgt_label
    return input_ids, labels


@pytest.mark.parametrize("mask_history", [False, True])
@pytest.mark.parametrize("seq_length", [25, 40, 57, 70, 90, 400])
def test_text_truncation_equals_llamafactory(seq_length, mask_history):
    messages = _turns("Describe the red circle and the green square in detail please.",
                      "The red circle is on the left and the green square is on the right of a white page.",
                      "And the blue triangle?", "It is small.",
                      "Say goodbye.", "Goodbye! It was a pleasure to describe the shapes with you today.")
    from omni_fast.data.template import encode_sample

    sample = encode_sample(messages, [], [], [], demo_processor(), mask_history=mask_history)
    cut = truncate_sample(sample, seq_length, 3, demo_processor(), mask_history)
    ids, labels = _lf_reference(messages, seq_length, mask_history)
    if isinstance(cut, str):
        assert not any(v != IGNORE_INDEX for v in labels), cut  # skipped only when nothing would be trained
        return
    assert cut.input_ids.tolist() == ids and cut.labels.tolist() == labels
    assert cut.input_ids.size <= seq_length


def test_truncation_never_cuts_a_media_block():
    from omni_fast.data.template import encode_sample

    red = str(demo_root() / "media" / "red_circle.png")
    square = str(demo_root() / "media" / "green_square.png")
    long_answer = " ".join(["The shape is round and red and sits in the middle of the picture."] * 3)
    messages = _turns("<image>What is it?", long_answer, "And this one?<image>", "A green square.")
    sample, n_pairs = _encode(messages, [red, square])
    ids = demo_processor().ids
    bos = np.flatnonzero(sample.input_ids == ids["vision_bos"])
    eos = np.flatnonzero(sample.input_ids == ids["vision_eos"])
    first, second = (int(bos[0]), int(eos[0]) + 1), (int(bos[1]), int(eos[1]) + 1)

    # plain LLaMA-Factory would cut the first prompt inside its image here (long answer, short budget)
    source_len = int((sample.labels != IGNORE_INDEX).argmax())
    target_len = int(np.flatnonzero(sample.input_ids == ids["im_start"])[3]) - source_len
    seq_length = next(n for n in range(first[1], 4 * first[1])
                      if first[0] < infer_seqlen(source_len, target_len, n)[0] < first[1])
    cut = truncate_sample(sample, seq_length, n_pairs, demo_processor(), False)
    assert not isinstance(cut, str) and cut.input_ids.size <= seq_length
    assert cut.image_grid_thw.tolist() == sample.image_grid_thw[:1].tolist()  # the second image left with its turn
    assert np.array_equal(cut.pixel_values, sample.pixel_values[: sample.image_grid_thw[0].prod()])
    assert np.array_equal(cut.input_ids[: first[1]], sample.input_ids[: first[1]])  # the whole first block
    assert (cut.labels != IGNORE_INDEX).any()
    _check_consistent(cut)

    # both turns start within the budget but the second image would be cut: that turn goes, with its image
    cut = truncate_sample(sample, second[0] + 3, n_pairs, demo_processor(), False)
    assert cut.image_grid_thw.shape == (1, 3) and cut.input_ids.size <= second[0] + 3
    _check_consistent(cut)

    # mask_history gives the last turn priority; the first turn (and its image) no longer fits
    last_only = encode_sample(messages, [red, square], [], [], demo_processor(), mask_history=True)
    cut = truncate_sample(last_only, 60, n_pairs, demo_processor(), True)
    assert cut.image_grid_thw.tolist() == sample.image_grid_thw[1:].tolist()
    assert cut.input_ids[-4:].tolist() == last_only.input_ids[-4:].tolist()
    _check_consistent(cut)

    # nothing fits: the first turn's image alone is longer than the budget
    assert "does not fit" in truncate_sample(sample, first[1] - 2, n_pairs, demo_processor(), False)
    # it fits: unchanged, same object
    assert truncate_sample(sample, sample.input_ids.size, n_pairs, demo_processor(), False) is sample


def test_samples_that_cannot_fit_are_skipped_and_counted(tmp_path, caplog):
    cfg = DataConfig.from_file(demo_root() / "data.json")
    raw = json.loads(json.dumps(cfg.raw))
    raw["dataset_param"]["basic_parameters"]["cache_dir"] = str(tmp_path / "cache")
    cfg = DataConfig.from_dict(raw)
    full = build_dataset(cfg, None, processor=demo_processor())
    lengths = [full[i].input_ids.size for i in range(len(full))]
    seq_length = 70
    with caplog.at_level(logging.WARNING, logger="omni_fast.data"):
        ds = build_dataset(cfg, seq_length, processor=demo_processor())
    assert ds.stats.from_cache  # the cache is independent of the sequence length
    assert len(ds) + ds.stats.skipped_length.total == len(full)
    assert ds.stats.truncated == sum(n > seq_length for n in lengths) - ds.stats.skipped_length.total
    assert ds.stats.skipped_length.total > 0
    assert f"cutting to seq_length {seq_length}: skipped {ds.stats.skipped_length.total} of 13" in caplog.text
    for i in range(len(ds)):
        s = ds[i]
        assert s.input_ids.size <= seq_length and (s.labels != IGNORE_INDEX).any()
        assert s.sample_id == ds.sample_id(i)


# ---------------------------------------------------------------------------------------------------- demo data


def test_demo_cli_writes_media_records_and_configs(tmp_path, monkeypatch):
    from omni_fast.data.demo import DEMO_FILES, main
    from omni_fast.data.media import load_audio, load_image, load_video

    monkeypatch.chdir(tmp_path)
    assert main(["--out", "data/demo", "--no-processor"]) == 0
    root = tmp_path / "data" / "demo"
    counts = {"all": 13, "mllm": 8, "video_audio": 3}
    for kind, name in DEMO_FILES.items():
        cfg = DataConfig.from_file(root / name)
        assert cfg.basic.dataset_dir == "data/demo"  # relative, as given: the guide's style
        records = read_records(cfg)
        assert len(records) == counts[kind]
    records = read_records(DataConfig.from_file(root / DEMO_FILES["all"]))
    assert sum(not (r.images or r.videos or r.audios) for r in records) == 3  # text-only rows mixed in
    assert sum(r.use_audio_in_video for r in records) == 3
    assert load_image(str(root / "media" / "red_circle.png")).size == (112, 112)
    clip = load_video(str(root / "media" / "square_moves.mp4"), video_fps=2.0, video_maxlen=8)
    assert len(clip.frames) == 4 and clip.duration == 2.0
    frame = np.asarray(clip.frames[0])
    assert tuple(frame[32, 8]) == pytest.approx((220, 30, 30), abs=12)  # the red square, through MPEG-4
    assert load_audio(str(root / "media" / "square_moves.mp4")).size >= 32000  # the clip's own sound track
    assert load_audio(str(root / "media" / "falling_tone.flac")).size == 32000  # 22.05 kHz resampled to 16 kHz


def test_ensure_demo_data_is_idempotent(tmp_path):
    from omni_fast.data.demo import ensure_demo_data

    root = demo_root()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "cache" not in p.parts}
    assert ensure_demo_data(root) == root
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "cache" not in p.parts}
    assert before == after
    cfg = DataConfig.from_file(root / "data.json")
    assert cfg.basic.dataset_dir == str(root) and cfg.preprocess.model_name_or_path == str(root / "tiny_processor")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a demo")
    with pytest.raises(FileExistsError, match="not a demo directory"):
        ensure_demo_data(tmp_path / "mine")
