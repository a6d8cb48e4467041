"""Qwen2.5-Omni 3-D rope index at ~1k to ~100k tokens: our compiled kernel vs transformers vs our numpy reference.

Rows per case (a case = one batch, one pytest-benchmark group):

* ``get_rope_index`` (C++): the public face, input checks included, serving from ``kernels/rope_index.h``;
* transformers 4.53 ``get_rope_index``: the peer, called as the tests call it (torch tensors in);
* ``get_rope_index_reference``: our numpy oracle (segment arithmetic, one Python step per row and per item).

The batches follow transformers_omni.md section 9: a "block" is 4 images of 448x448 (grid 1x32x32, 256 tokens
each), 2 standalone 30 s audios (3000 mel frames, 750 tokens each) and one 20 s video at 2 fps (grid 20x24x24,
2880 tokens) with its 20 s audio interleaved (2000 mel frames, 500 tokens, ``use_audio_in_video=True``), plus text
spread between the items up to the case's length. The rope index is memory-bound (it reads the ids and the mask
and writes three int64 positions per token), so the derived metric is GB/s of that traffic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from harness import best_seconds
from sequences import Batch, build_batch, build_row
from test_rope_index import TOKEN_KW, hf_rope_index

from omni_fast.ops import dispatch
from omni_fast.ops.rope_index import backend_reasons, get_rope_index, get_rope_index_reference

# one section-9 block (5920 tokens without text); the ~1k case uses a small one (874 tokens)
BLOCK = [("image", (1, 32, 32))] * 4 + [("audio", 3000)] * 2 + [("av", (20, 24, 24), 1.0, 2000)]
SMALL_BLOCK = [("image", (1, 32, 32)), ("audio", 1000), ("av", (4, 16, 16), 1.0, 400)]


def _row(block: list[tuple], blocks: int, tokens: int) -> list[tuple]:
    """``blocks`` copies of ``block`` with text spread before each item and at the end, ``tokens`` in all."""
    items = block * blocks
    text = tokens - len(build_row(items, np.random.default_rng(0))[0])
    assert text >= len(items) + 1, "not enough room for the text"
    share, extra = divmod(text, len(items) + 1)
    row: list[tuple] = []
    for i, item in enumerate(items):
        row += [("text", share + (i < extra)), item]
    return row + [("text", share)]


CASES: dict[str, tuple[list[list[tuple]], int]] = {
    # name: (rows, target tokens per row)
    "~1k tokens": ([_row(SMALL_BLOCK, 1, 1024)], 1024),
    "~8k tokens": ([_row(BLOCK, 1, 8192)], 8192),
    "~12k tokens": ([_row(BLOCK, 1, 11804)], 11804),
    "~32k tokens": ([_row(BLOCK, 2, 32390)], 32390),
    "~100k tokens": ([_row(BLOCK, 4, 100030)], 100030),
    "batch 4 x ~12k tokens": ([_row(BLOCK, 1, 11804)] * 4, 11804),
}

KERNEL = "get_rope_index (C++)"
TRANSFORMERS = "transformers 4.53"
REFERENCE = "numpy reference"
IMPLS = (KERNEL, TRANSFORMERS, REFERENCE)
COMPARE = {
    KERNEL: {"vs transformers (peer)": TRANSFORMERS, "vs its reference": REFERENCE},
    REFERENCE: {"vs transformers (peer)": TRANSFORMERS},
}

NOTE = (
    "Blocks as in transformers_omni.md sec. 9 (4 images 448x448, 2 audios of 30 s, a 20 s video at 2 fps with its "
    "20 s audio interleaved; text spread between the items); the ~1k case uses 1 image, a 10 s audio and a 4 s "
    "video (grid 4x16x16) with its audio. Token ids are the tiny test model's; only their layout matters. All rows "
    "take numpy arrays (transformers: torch tensors made beforehand, untimed) and return fresh outputs. The kernel "
    "processes rows in parallel only from 2^19 tokens per batch (kernels/rope_index.h says why), so every case here "
    "runs on one thread, like transformers (timed with torch on one thread, its faster setting for this loop of tiny "
    "tensor ops) and numpy. Compulsory traffic: read ids and mask, write 3 "
    "positions (5 x 8 bytes per token). Before timing, every row's output is checked equal to the kernel's "
    "(untimed). Shared 2-core machine: minima over rounds."
)


def _batch(name: str) -> Batch:
    rows, tokens = CASES[name]
    b = build_batch(rows, "right")
    assert all(length == tokens for length in b.lengths), (name, b.lengths)
    return b


def _callable(impl: str, b: Batch) -> Callable[[], tuple[Any, Any]]:
    args = (
        b.input_ids,
        b.image_grid_thw,
        b.video_grid_thw,
        b.attention_mask,
        b.use_audio_in_video,
        b.audio_seqlens,
        b.second_per_grids,
    )
    if impl == KERNEL:
        return lambda: get_rope_index(*args, **TOKEN_KW)
    if impl == REFERENCE:
        return lambda: get_rope_index_reference(*args, **TOKEN_KW)
    if impl == TRANSFORMERS:
        # the tensors are made once, outside the timing, like a caller that already holds torch tensors
        return _transformers_call(b)
    raise ValueError(impl)


def _transformers_call(b: Batch) -> Callable[[], tuple[Any, Any]]:
    from test_rope_index import HFOmni, hf_self

    obj = hf_self()
    tensors = (
        torch.from_numpy(b.input_ids),
        torch.from_numpy(b.image_grid_thw),
        torch.from_numpy(b.video_grid_thw),
        torch.from_numpy(b.attention_mask),
        b.use_audio_in_video,
        torch.from_numpy(b.audio_seqlens),
        torch.tensor(b.second_per_grids, dtype=torch.float32),
    )
    return lambda: HFOmni.get_rope_index(obj, *tensors)


@pytest.fixture(scope="module")
def batches() -> dict[str, Batch]:
    return {name: _batch(name) for name in CASES}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_rope_index(benchmark: Any, batches: dict[str, Batch], case: str, impl: str) -> None:
    # otherwise the "C++" rows would time the numpy reference
    assert dispatch.choose("rope_index", backend_reasons()) == "cpu_kernel"
    b = batches[case]
    benchmark.group = f"rope index, {case} (batch {b.input_ids.shape[0]} x {b.input_ids.shape[1]})"
    fn = _callable(impl, b)

    want_pos, want_delta = _callable(KERNEL, b)()
    if impl == KERNEL:  # the kernel itself is checked against transformers (the others are checked against it)
        hf_pos, hf_delta = hf_rope_index(b)
        assert np.array_equal(want_pos, hf_pos) and np.array_equal(want_delta, hf_delta)
    pos, delta = (np.asarray(x) for x in fn())
    assert np.array_equal(pos, want_pos) and np.array_equal(delta, want_delta), impl

    # transformers' loop of tiny tensor ops runs faster on one torch thread here (2 threads: 1.3-2x slower)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_call = best_seconds(fn, repeats=2, warmup=0)
        # about 1 s per row, 5 to 200 rounds: the kernel gets many (its minimum needs them on a shared machine)
        rounds = int(min(200, max(5, 1.0 / per_call)))
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    finally:
        torch.set_num_threads(torch_threads)
    tokens = int(b.input_ids.size)
    benchmark.extra_info.update(
        impl=impl,
        compare=COMPARE.get(impl, {}),
        headline=impl == KERNEL and tokens >= 8000,
        tokens=tokens,
        bytes=5 * 8 * tokens,
        note=NOTE,
    )
