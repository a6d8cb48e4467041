"""Weight conversion at the 7B thinker's tensor shapes: the compiled path vs the numpy oracle vs a plain file copy.

A synthetic Hugging Face checkpoint with every tensor shape of Qwen2.5-Omni-7B's thinker but fewer layers (text 2,
vision 4, audio 4: 3.6 GB in bf16, dominated by the 152064 x 3584 embedding and LM head), hub layout (``thinker.``
prefix, a small talker tensor, 2 shards with an index), random bits. It is generated once under
``$OMNI_BENCH_CONVERT_DIR`` (default /tmp/omni_fast_bench_convert), never in the repository, after checking the
free disk space, and reused by later runs.

Rows per case (a case = one conversion, one pytest-benchmark group):

* ``compiled``: ``omni_fast.convert.hf_to_mm`` / ``mm_to_hf`` as ``mm-convert`` runs them (validation, planning,
  the C++ copy from memory-mapped files, the final rename), all OpenMP threads (one per output file at a time);
* ``numpy oracle``: the same call with ``backend="numpy"``, MindSpeed-MM's procedure on whole arrays (a stand-in
  for the peer, which converts tensor by tensor in Python with torch);
* ``plain copy``: ``shutil.copyfile`` of the input's weight files, the same number of bytes with no conversion at
  all: what the disk and page cache allow.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import QuietRounds, wait_for_quiet

from omni_fast.config.model_config import ThinkerConfig
from omni_fast.convert import ParallelLayout, hf_to_mm, mm_to_hf
from omni_fast.convert.qwen2_5_omni import hf_thinker_shapes
from omni_fast.convert.safetensors_io import build_header

ROOT = Path(os.environ.get("OMNI_BENCH_CONVERT_DIR", "/tmp/omni_fast_bench_convert"))
CONFIG = {
    "model_type": "qwen2_5_omni",
    "thinker_config": {  # Qwen2.5-Omni-7B's sizes, fewer layers
        "model_type": "qwen2_5_omni_thinker",
        "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 2, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "tie_word_embeddings": False},
        "vision_config": {"depth": 4, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "spatial_merge_size": 2, "patch_size": 14, "temporal_patch_size": 2,
                          "in_channels": 3},
        "audio_config": {"encoder_layers": 4, "d_model": 1280, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                         "output_dim": 3584, "num_mel_bins": 128},
    },
}
TALKER = {"talker.model.embed_tokens.weight": (8192, 896)}
SHARDS = 2
NEEDED_GB = 16  # input 3.6 GB + the MM checkpoint read by mm_to_hf + one output at a time, with room to spare

CASES = {  # name: (direction, tensor-parallel size); pipeline stages as the guide's 7B example: text split in 2
    "hf_to_mm, PP 2, TP 1": ("hf_to_mm", 1),
    "hf_to_mm, PP 2, TP 2": ("hf_to_mm", 2),
    "mm_to_hf, PP 2, TP 2": ("mm_to_hf", 2),
}
COMPILED, NUMPY, COPY = "compiled (C++, memory-mapped)", "numpy oracle", "plain copy (shutil.copyfile)"
COMPARE = {COMPILED: {"vs numpy oracle": NUMPY, "vs plain copy (disk limit)": COPY},
           NUMPY: {"vs plain copy (disk limit)": COPY}}
NOTE = (
    "Synthetic checkpoint with Qwen2.5-Omni-7B's thinker tensor shapes, text 2 / vision 4 / audio 4 layers "
    "(3.63 GB of bf16 thinker weights, plus a 15 MB talker tensor), 2 shards, random bits. Pipeline layout "
    "text [1,1], vision [4,0], audio [4,0]. Each round starts after the removal of the previous output and "
    "os.sync() (untimed); no row calls fsync, so the times include writing into the page cache and whatever "
    "writeback the kernel does meanwhile, the same for all three rows. The two hf_to_mm cases' copy rows copy the "
    "same files: a large difference between them is noise. GB/s counts bytes read + bytes written. Before timing, "
    "the compiled and numpy outputs are checked byte-identical (untimed). Shared 2-core VM: minima over rounds."
)
LAYOUT = {"llm_pp_layers": "[1,1]", "vit_pp_layers": "[4,0]", "audio_pp_layers": "[4,0]"}


def _write_synthetic(out: Path) -> None:
    """The HF directory: config.json, shards written in the library's layout, an index; random bits, streamed."""
    out.mkdir(parents=True)
    shapes = {f"thinker.{k}": v for k, v in hf_thinker_shapes(ThinkerConfig.from_dict(CONFIG)).items()}
    shapes.update(TALKER)
    nbytes = {name: math.prod(shape) * 2 for name, shape in shapes.items()}
    shards: list[list[str]] = [[] for _ in range(SHARDS)]
    sizes = [0] * SHARDS
    for name in sorted(shapes, key=lambda n: -nbytes[n]):  # balance the shards, biggest first
        k = sizes.index(min(sizes))
        shards[k].append(name)
        sizes[k] += nbytes[name]
    rng = np.random.default_rng(0)
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{SHARDS:05d}.safetensors"
        header, offsets = build_header((n, "BF16", shapes[n]) for n in names)
        with open(out / file, "wb") as f:
            f.write(header)
            for name in sorted(names, key=offsets.get):
                left = nbytes[name]
                while left:
                    chunk = min(left, 256 << 20)
                    f.write(rng.bytes(chunk))
                    left -= chunk
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (out / "tokenizer_config.json").write_text("{}")


@pytest.fixture(scope="module")
def workspace() -> dict[str, Path]:
    """The synthetic HF directory (made once), a TP-2 MM checkpoint of it for mm_to_hf, and a scratch directory."""
    hf = ROOT / "hf_7b_shapes"
    stamp = hf / ".complete"
    if not (stamp.is_file() and stamp.read_text() == json.dumps(CONFIG)):
        shutil.rmtree(hf, ignore_errors=True)
        ROOT.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(ROOT).free / 1e9
        if free < NEEDED_GB:
            pytest.fail(f"{ROOT}: {free:.1f} GB free, the conversion benchmark needs {NEEDED_GB} GB "
                        "(set OMNI_BENCH_CONVERT_DIR elsewhere)")
        _write_synthetic(hf)
        stamp.write_text(json.dumps(CONFIG))
    mm = ROOT / "mm_tp2"
    if not (mm / "latest_checkpointed_iteration.txt").is_file():
        shutil.rmtree(mm, ignore_errors=True)
        hf_to_mm(hf, mm, ParallelLayout.parse(**LAYOUT, tp_size=2))
    scratch = ROOT / "out"
    shutil.rmtree(scratch, ignore_errors=True)
    return {"hf": hf, "mm": mm, "scratch": scratch}


def _run(impl: str, direction: str, tp: int, ws: dict[str, Path], out: Path) -> None:
    layout = ParallelLayout.parse(**LAYOUT, tp_size=tp)
    if impl == COPY:
        src = ws["hf"] if direction == "hf_to_mm" else ws["mm"]
        out.mkdir()
        for file in sorted(src.rglob("*.safetensors")):
            shutil.copyfile(file, out / f"{file.parent.name}_{file.name}")
        return
    backend = "compiled" if impl == COMPILED else "numpy"
    if direction == "hf_to_mm":
        hf_to_mm(ws["hf"], out, layout, backend=backend)
    else:
        mm_to_hf(ws["mm"], ws["hf"], out, layout, backend=backend)


def _weights(root: Path) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_size for f in sorted(root.rglob("*.safetensors"))}


def _same_files(a: Path, b: Path) -> bool:
    if _weights(a) != _weights(b):
        return False
    for rel in _weights(a):
        with open(a / rel, "rb") as fa, open(b / rel, "rb") as fb:
            while True:
                x, y = fa.read(64 << 20), fb.read(64 << 20)
                if x != y:
                    return False
                if not x:
                    break
    return True


CHECKED: set[str] = set()


@pytest.mark.parametrize("impl", [COMPILED, NUMPY, COPY])
@pytest.mark.parametrize("case", list(CASES))
def test_convert(benchmark: Any, workspace: dict[str, Path], case: str, impl: str) -> None:
    direction, tp = CASES[case]
    scratch = workspace["scratch"]
    if case not in CHECKED:  # untimed: the two converters write the same bytes
        _run(COMPILED, direction, tp, workspace, scratch / "a")
        _run(NUMPY, direction, tp, workspace, scratch / "b")
        assert _same_files(scratch / "a", scratch / "b"), case
        shutil.rmtree(scratch)
        CHECKED.add(case)
    src = workspace["hf"] if direction == "hf_to_mm" else workspace["mm"]
    read = sum(_weights(src).values())
    out = scratch / "timed"

    quiet = QuietRounds(budget=30.0)

    def setup() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        os.sync()  # start every round without another round's dirty pages in flight
        quiet.setup()  # and in a quiet moment (at most 2 s per round), counting others' CPU from here

    benchmark.group = f"{case} (7B shapes, 3.6 GB bf16)"
    busy = wait_for_quiet()
    benchmark.pedantic(lambda: _run(impl, direction, tp, workspace, out), setup=setup, teardown=quiet.teardown,
                       rounds=3 if impl == NUMPY else 7, warmup_rounds=0, iterations=1)
    written = sum(_weights(out).values())
    shutil.rmtree(scratch, ignore_errors=True)
    benchmark.extra_info.update(
        impl=impl,
        compare=COMPARE.get(impl, {}),
        headline=impl == COMPILED,
        bytes=read + written,
        details={"GB written": written / 1e9, "others' CPU while timed, %": 100 * quiet.others_fraction,
                 "CPU busy before, %": 100 * busy},
        section="Weight conversion (mm-convert)",
        note=NOTE,
    )
