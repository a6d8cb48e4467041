"""The generated demo dataset and its processor, built once per test process (building takes seconds)."""

from __future__ import annotations

import atexit
import copy
import functools
import json
import shutil
import tempfile
from pathlib import Path

from omni_fast.data.config import DataConfig
from omni_fast.data.demo import ensure_demo_data
from omni_fast.data.processor import OmniProcessor

# shared/ lies beside the repository checkout (for developers and in CI).
LLAMAFACTORY_DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory_demo"


@functools.cache
def demo_root() -> Path:
    base = Path(tempfile.mkdtemp(prefix="omni_fast_demo_"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    return ensure_demo_data(base / "demo")


@functools.cache
def demo_processor() -> OmniProcessor:
    from omni_fast.data.dataset import make_processor

    return make_processor(DataConfig.from_file(demo_root() / "data.json"))


def demo_raw(name: str = "data.json") -> dict:
    """A fresh copy of one of the demo's data.json files (to modify in a test)."""
    return copy.deepcopy(json.loads((demo_root() / name).read_text()))


def config_for(tmp: Path, records: dict[str, list], **basic) -> DataConfig:
    """A demo-processor data.json over ``records`` (file name -> records) written to ``tmp``, cache in ``tmp``."""
    for name, recs in records.items():
        (tmp / name).write_text(json.dumps(recs))
    raw = demo_raw()
    b = raw["dataset_param"]["basic_parameters"]
    b.update(dataset_dir=str(tmp), dataset=",".join(records), cache_dir=str(tmp / "cache"))
    b.update(basic)
    return DataConfig.from_dict(raw, str(tmp / "data.json"))
