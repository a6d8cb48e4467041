"""The data pipeline: preprocessing cache (cold vs warm), sample access + collation, and the LLaVA converter.

Groups:

* ``data cache, <dataset>``: ``build_dataset`` on an empty cache directory (read + check records, decode media,
  tokenize, write safetensors shards) against ``build_dataset`` when the cache exists (read + check records, key,
  open the shards and index them). The processor is built once outside the timing. Datasets: the generated demo
  (images, text-only, video+audio, audio) repeated 8 times (104 records), and LLaMA-Factory's real demo files
  (JPEG images, MP3/WAV/FLAC audio, the MP4 video+audio records; 12 records).
* ``data loading, batch of 4``: reading 4 samples and collating them (right padding to a multiple of 8, media
  concatenation, rope positions per row), with the media in the cache against ``cache_media: false`` (decoded
  again on use, as the reference's collator does).
* ``LLaVA converter, 150k records``: ``convert_llava`` on a synthetic llava_instruct_150k.json (150k records, 10%
  text-only, 1% with a missing image; COCO-style names, empty image files) against the floor any converter pays:
  ``json.load`` of the input plus ``json.dumps`` + write of the same records.

Untimed checks: the warm dataset's samples equal the cold one's; the converter's record counts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from omni_fast.data.collator import OmniCollator
from omni_fast.data.config import DataConfig
from omni_fast.data.dataset import build_dataset, make_processor
from omni_fast.data.demo import ensure_demo_data
from omni_fast.data.llava_to_mllm import convert_llava

LLAMAFACTORY_DEMO = Path("/work/shared/data/llamafactory_demo")
NOTE_CACHE = (
    "cold = empty cache dir (records read and checked, media decoded, tokens + arrays written as safetensors "
    "shards); warm = the same call with the cache present (records read and checked, key computed over data files "
    "and media stats, shards memory-mapped and indexed). Processor built once, untimed. Shared 2-core machine: "
    "minima over rounds."
)


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="omni_fast_bench_data_"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def demo(workdir) -> Path:
    return ensure_demo_data(workdir / "demo")


def _write_once(path: Path, records: list) -> None:
    """Write a data file once: rewriting it would change its mtime, hence the cache key."""
    if not path.exists():
        path.write_text(json.dumps(records))


def _config(demo: Path, workdir: Path, case: str, cache: Path, cache_media: bool = True) -> DataConfig:
    raw = json.loads((demo / "data.json").read_text())
    basic = raw["dataset_param"]["basic_parameters"]
    if case == "demo x8":
        records = []
        for name in ("mllm_demo.json", "video_audio_demo.json", "audio_demo.json"):
            records += json.loads((demo / name).read_text())
        _write_once(workdir / "demo_x8.json", records * 8)
        basic.update(dataset=str(workdir / "demo_x8.json"))
    else:  # LLaMA-Factory's files; video-only records have no sound track, so audio-in-video stays off for them
        recs = []
        for name in ("mllm_demo.json", "mllm_audio_demo.json", "mllm_video_audio_demo.json"):
            recs += json.loads((LLAMAFACTORY_DEMO / name).read_text())
        for r in recs:
            r.update({k: [str(LLAMAFACTORY_DEMO / p) for p in r[k]] for k in ("images", "videos", "audios") if k in r})
        _write_once(workdir / "lf.json", recs)
        basic.update(dataset=str(workdir / "lf.json"))
        raw["dataset_param"]["preprocess_parameters"].update(
            image_max_pixels=262144, video_max_pixels=16384, video_maxlen=128
        )
    basic.update(cache_dir=str(cache), cache_media=cache_media)
    return DataConfig.from_dict(raw, f"bench {case}")


CASES = ("demo x8", "LLaMA-Factory demo")


@pytest.mark.parametrize("impl", ["cold (preprocess)", "warm (cache reused)"])
@pytest.mark.parametrize("case", CASES)
def test_cache(benchmark: Any, demo: Path, workdir: Path, case: str, impl: str) -> None:
    benchmark.group = f"data cache, {case}"
    processor = make_processor(_config(demo, workdir, case, workdir / "unused"))
    warm_dir = workdir / f"warm-{case}"
    reference = build_dataset(_config(demo, workdir, case, warm_dir), 4096, processor=processor)
    counter = iter(range(10**6))

    def setup():
        cache = workdir / f"cold-{case}-{next(counter)}" if impl.startswith("cold") else warm_dir
        return (_config(demo, workdir, case, cache),), {}

    def run(cfg):
        return build_dataset(cfg, 4096, processor=processor)

    ds = run(setup()[0][0])
    assert ds.stats.from_cache == impl.startswith("warm") and len(ds) == len(reference)
    for i in range(len(ds)):
        a, b = ds[i], reference[i]
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        if a.pixel_values is not None:
            assert np.array_equal(a.pixel_values, b.pixel_values)
    benchmark.pedantic(run, setup=setup, rounds=5 if impl.startswith("warm") else 3, warmup_rounds=0)
    tokens = sum(int(reference[i].input_ids.size) for i in range(len(reference)))
    size = sum(f.stat().st_size for f in Path(reference.stats.cache_dir).glob("*.safetensors"))
    benchmark.extra_info.update(
        impl=impl,
        compare={"speed-up over preprocessing": "cold (preprocess)"} if impl.startswith("warm") else {},
        headline=impl.startswith("warm"),
        tokens=tokens,
        details={"samples": len(reference), "cache MB": size / 1e6},
        note=NOTE_CACHE,
    )


@pytest.mark.parametrize("impl", ["media in the cache", "cache_media: false (decode on use)"])
def test_loading(benchmark: Any, demo: Path, workdir: Path, impl: str) -> None:
    benchmark.group = "data loading, batch of 4 (demo x8)"
    cached = impl == "media in the cache"
    cfg = _config(demo, workdir, "demo x8", workdir / f"load-{cached}", cache_media=cached)
    ds = build_dataset(cfg, 4096, processor=make_processor(cfg))
    collate = OmniCollator.from_processor(ds.processor)
    picks = [0, 3, 8, 11]  # an image, two images over two turns, video+audio, audio

    def run():
        return collate([ds[i] for i in picks])

    out = run()
    assert out["input_ids"].shape[1] % 8 == 0 and "pixel_values_videos" in out and "input_features" in out
    benchmark.pedantic(run, rounds=20, warmup_rounds=1)
    benchmark.extra_info.update(
        impl=impl,
        compare={"vs decode on use": "cache_media: false (decode on use)"} if cached else {},
        tokens=int(out["attention_mask"].sum()),
        note="4 samples read from the cache and collated (rope positions included); the tokens are the real ones.",
    )


def _synthetic_llava(root: Path, n: int = 150_000) -> tuple[Path, Path]:
    coco = root / "COCO2017"
    (coco / "train2017").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rec: dict[str, Any] = {"id": f"{i:012d}", "conversations": [
            {"from": "human", "value": "<image>\nWhat is happening in this picture? Describe it."},
            {"from": "gpt", "value": "A group of people stands next to a red bus on a city street. " * 4},
            {"from": "human", "value": "What might they be waiting for?"},
            {"from": "gpt", "value": "They are probably waiting to board the bus. " * 3},
        ]}
        if i % 10:
            rec["image"] = f"{i % 118_000:012d}.jpg"
        else:
            rec["conversations"][0]["value"] = "Tell me about buses."
        records.append(rec)
    for j in range(118_000 - 1_180):  # the last ~1% of image names are missing
        (coco / "train2017" / f"{j:012d}.jpg").touch()
    path = root / "llava_instruct_150k.json"
    path.write_text(json.dumps(records))
    return path, coco


@pytest.fixture(scope="module")
def llava(workdir):
    return _synthetic_llava(workdir / "llava")


@pytest.mark.parametrize("impl", ["convert_llava", "json load + dump (floor)"])
def test_llava_converter(benchmark: Any, llava, workdir: Path, impl: str) -> None:
    benchmark.group = "LLaVA converter, 150k records"
    path, coco = llava
    counter = iter(range(10**6))

    def setup():
        return (workdir / f"out-{impl[:4]}-{next(counter)}.json",), {}

    def convert(out: Path):
        return convert_llava(path, coco, out)

    def floor(out: Path):
        data = json.loads(path.read_text())
        out.write_text(json.dumps(data, ensure_ascii=False))

    fn = convert if impl == "convert_llava" else floor
    if impl == "convert_llava":
        report = convert(setup()[0][0])
        assert report.records_in == 150_000 and report.text_only == 15_000 and report.missing_images > 0
        assert report.written == 150_000 - report.missing_images
    benchmark.pedantic(fn, setup=setup, rounds=2, warmup_rounds=0)
    benchmark.extra_info.update(
        impl=impl,
        compare={"vs the JSON floor": "json load + dump (floor)"} if impl == "convert_llava" else {},
        headline=impl == "convert_llava",
        details={"records": 150_000, "input MB": path.stat().st_size / 1e6},
        note="Synthetic llava_instruct_150k.json; image existence checked by listing train2017/ once.",
    )
