"""Multimodal scatter forward and forward+backward at the 7B thinker's size: our kernel vs the masked_scatter
composition vs torch, in one run.

The case: one row of 8192 tokens, hidden 3584 (Qwen2.5-Omni-7B), fp32 (the CPU compute dtype), with 3054
placeholder rows in blocks as the processor lays them out: text, an image (1024 tokens), text, a video
(1280 tokens), text, a 30 s audio (750 tokens), text.

Rows per case (a case = direction, one pytest-benchmark group):

* MindSpore kernel: ``omni_fast.ops.multimodal_scatter`` with the ``cpu_kernel`` backend (our aot custom op and
  its bprop), PyNative and under ``ms.jit``. In PyNative the face also checks the placeholder counts on the host
  (ids to numpy), which is timed;
* MindSpore reference: ``multimodal_scatter_reference``, one ``masked_scatter`` per modality with MindSpore's
  autodiff, PyNative and jit;
* torch: the same three ``masked_scatter`` calls (what transformers does) with ``torch.autograd.grad``: the peer;
* the C++ sandbox on numpy (``omni_fast._C``): fast path vs scalar reference, without MindSpore in the way.

A copy is memory-bound, so the derived metric is GB/s of compulsory traffic, not a fraction of the GEMM peak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mindspore as ms
import numpy as np
import pytest
import torch
from harness import best_seconds, ms_sync, to_numpy, wait_for_quiet
from mindspore import Tensor

from omni_fast.ops import multimodal_scatter
from omni_fast.ops.library import host_module
from omni_fast.ops.reference import multimodal_scatter_reference
from omni_fast.ops.scatter import AUDIO_TOKEN_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, MultimodalScatter, explain

HIDDEN = 3584
# (kind, tokens): 8192 tokens in all, 3054 of them placeholders.
LAYOUT = [("text", 700), ("image", 1024), ("text", 1500), ("video", 1280), ("text", 1200), ("audio", 750),
          ("text", 1738)]  # fmt: skip
TOKEN_IDS = {"audio": AUDIO_TOKEN_ID, "image": IMAGE_TOKEN_ID, "video": VIDEO_TOKEN_ID}
MODALITIES = ("audio", "image", "video")  # the reference's order
DIRECTIONS = ("fwd", "fwd+bwd")

MS_KERNEL = "MindSpore kernel (PyNative)"
MS_REFERENCE = "MindSpore masked_scatter x3 (PyNative)"
MS_KERNEL_JIT = "MindSpore kernel (jit)"
MS_REFERENCE_JIT = "MindSpore masked_scatter x3 (jit)"
TORCH = "torch masked_scatter x3"
SANDBOX_FAST = "C++ fast path (numpy sandbox)"
SANDBOX_SCALAR = "C++ scalar reference (numpy sandbox)"
IMPLS = (MS_KERNEL, MS_REFERENCE, MS_KERNEL_JIT, MS_REFERENCE_JIT, TORCH, SANDBOX_FAST, SANDBOX_SCALAR)

COMPARE = {
    MS_KERNEL: {
        "vs its reference": MS_REFERENCE,
        "vs reference (jit)": MS_REFERENCE_JIT,
        "vs torch (peer)": TORCH,
    },
    MS_KERNEL_JIT: {"vs its reference": MS_REFERENCE_JIT, "vs torch (peer)": TORCH},
    MS_REFERENCE: {"vs torch (peer)": TORCH},
    MS_REFERENCE_JIT: {"vs torch (peer)": TORCH},
    SANDBOX_FAST: {"vs its reference": SANDBOX_SCALAR, "vs torch (peer)": TORCH},
}
HEADLINE = {MS_KERNEL, MS_KERNEL_JIT}

NOTE = (
    "MindSpore rows run in PyNative with launch_blocking; the jit rows compile the same call with `ms.jit`. "
    "fwd+bwd is `ms.vjp` over (embeds, ids, audio, image, video) returning the output and the four float "
    "cotangents for a given d_out (the output is returned so that jit cannot drop the forward); "
    "`torch.autograd.grad(out, (embeds, audio, image, video), d_out)` for torch. The sandbox calls "
    "`omni_fast._C.multimodal_scatter_forward/backward` on numpy arrays, writing into outputs allocated once (as "
    "MindSpore's memory pool does; torch allocates per call): fast path with OpenMP (2 threads) and streaming "
    "stores, scalar reference single-threaded with normal stores (a loop the compiler vectorises). Compulsory "
    "traffic (N tokens, F placeholder rows, H hidden, fp32): fwd reads N - F embedding rows and F feature rows and "
    "writes N rows (2NH floats) plus the int32 ids; fwd+bwd adds reading d_out and writing d_embeds and d_features "
    "(4NH + FH floats in all). Before timing, every row's outputs are checked to be exactly equal to the fast "
    "path's, untimed."
)


def _kernel(embeds: Tensor, ids: Tensor, audio: Tensor, image: Tensor, video: Tensor) -> Tensor:
    return multimodal_scatter(embeds, ids, image_embeds=image, video_embeds=video, audio_embeds=audio)


def _reference(embeds: Tensor, ids: Tensor, audio: Tensor, image: Tensor, video: Tensor) -> Tensor:
    features = [(AUDIO_TOKEN_ID, audio), (IMAGE_TOKEN_ID, image), (VIDEO_TOKEN_ID, video)]
    return multimodal_scatter_reference(embeds, ids, features)


def _kernel_fwd_bwd(*args: Tensor) -> tuple[Tensor, ...]:
    *inputs, d_out = args
    out, pullback = ms.vjp(_kernel, *inputs)
    d_embeds, _, d_audio, d_image, d_video = pullback(d_out)  # the int ids get a zero cotangent
    return out, d_embeds, d_audio, d_image, d_video


def _reference_fwd_bwd(*args: Tensor) -> tuple[Tensor, ...]:
    *inputs, d_out = args
    out, pullback = ms.vjp(_reference, *inputs)
    d_embeds, _, d_audio, d_image, d_video = pullback(d_out)
    return out, d_embeds, d_audio, d_image, d_video


# ms.jit needs module-level functions written out in a file; one per (implementation, direction).
@ms.jit
def _jit_kernel_fwd(embeds: Tensor, ids: Tensor, audio: Tensor, image: Tensor, video: Tensor) -> Tensor:
    return _kernel(embeds, ids, audio, image, video)


@ms.jit
def _jit_reference_fwd(embeds: Tensor, ids: Tensor, audio: Tensor, image: Tensor, video: Tensor) -> Tensor:
    return _reference(embeds, ids, audio, image, video)


@ms.jit
def _jit_kernel_fwd_bwd(
    embeds: Tensor, ids: Tensor, audio: Tensor, image: Tensor, video: Tensor, d_out: Tensor
) -> tuple[Tensor, ...]:
    return _kernel_fwd_bwd(embeds, ids, audio, image, video, d_out)


@ms.jit
def _jit_reference_fwd_bwd(
    embeds: Tensor, ids: Tensor, audio: Tensor, image: Tensor, video: Tensor, d_out: Tensor
) -> tuple[Tensor, ...]:
    return _reference_fwd_bwd(embeds, ids, audio, image, video, d_out)


@dataclass
class Inputs:
    embeds: np.ndarray  # [1, N, H]
    ids: np.ndarray  # [1, N] int32
    features: tuple[np.ndarray, np.ndarray, np.ndarray]  # audio, image, video [rows, H]
    d_out: np.ndarray  # [1, N, H]
    ms_args: tuple[Tensor, ...]  # embeds, ids, audio, image, video
    ms_d_out: Tensor


def make_inputs() -> Inputs:
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [rng.integers(0, 150000, n) if kind == "text" else np.full(n, TOKEN_IDS[kind]) for kind, n in LAYOUT]
    ).astype(np.int32)[None]
    counts = {kind: n for kind, n in LAYOUT if kind != "text"}
    tokens = ids.shape[1]
    embeds = rng.standard_normal((1, tokens, HIDDEN), dtype=np.float32)
    features = tuple(rng.standard_normal((counts[name], HIDDEN), dtype=np.float32) for name in MODALITIES)
    d_out = rng.standard_normal((1, tokens, HIDDEN), dtype=np.float32)
    ms_args = (Tensor(embeds), Tensor(ids), *(Tensor(f) for f in features))
    return Inputs(embeds, ids, features, d_out, ms_args, Tensor(d_out))


@pytest.fixture(scope="module")
def inputs() -> Inputs:
    return make_inputs()


def _torch_fwd_bwd(d: Inputs, fwd: bool) -> Callable[[], tuple[Any, ...]]:
    ids = torch.from_numpy(d.ids)
    masks = [(ids == TOKEN_IDS[name]).unsqueeze(-1) for name in MODALITIES]
    embeds = torch.from_numpy(d.embeds)
    features = [torch.from_numpy(f) for f in d.features]
    d_out = torch.from_numpy(d.d_out)

    def scatter(e: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        for mask, f in zip(masks, feats):
            e = e.masked_scatter(mask.expand_as(e), f)
        return e

    if fwd:
        return lambda: (scatter(embeds, features),)
    leaves = [t.clone().requires_grad_(True) for t in (embeds, *features)]

    def fwd_bwd() -> tuple[torch.Tensor, ...]:
        out = scatter(leaves[0], leaves[1:])
        return (out, *torch.autograd.grad(out, leaves, d_out))

    return fwd_bwd


def _callable(impl: str, direction: str, d: Inputs) -> Callable[[], tuple[Any, ...]]:
    """The call to time; it returns (out,) or (out, d_embeds, d_audio, d_image, d_video)."""
    fwd = direction == "fwd"
    args, d_out = d.ms_args, d.ms_d_out
    if impl == MS_KERNEL:
        return (lambda: (ms_sync(_kernel(*args)),)) if fwd else (lambda: ms_sync(_kernel_fwd_bwd(*args, d_out)))
    if impl == MS_REFERENCE:
        return (lambda: (ms_sync(_reference(*args)),)) if fwd else (lambda: ms_sync(_reference_fwd_bwd(*args, d_out)))
    if impl == MS_KERNEL_JIT:
        if fwd:
            return lambda: (ms_sync(_jit_kernel_fwd(*args)),)
        return lambda: ms_sync(_jit_kernel_fwd_bwd(*args, d_out))
    if impl == MS_REFERENCE_JIT:
        if fwd:
            return lambda: (ms_sync(_jit_reference_fwd(*args)),)
        return lambda: ms_sync(_jit_reference_fwd_bwd(*args, d_out))
    if impl == TORCH:
        return _torch_fwd_bwd(d, fwd)
    if impl in (SANDBOX_FAST, SANDBOX_SCALAR):
        c = host_module()
        scalar = impl == SANDBOX_SCALAR
        token_ids = [TOKEN_IDS[name] for name in MODALITIES]
        rows = [len(f) for f in d.features]

        # Outputs allocated (and their pages faulted in) once, then written into by every call: MindSpore's
        # memory pool hands its kernels warm buffers too, and fresh 117 MB arrays would time the page faults.
        out = c.multimodal_scatter_forward(d.embeds, d.ids, list(d.features), token_ids, scalar)
        grads = c.multimodal_scatter_backward(d.d_out, d.ids, rows, token_ids, scalar)

        def sandbox() -> tuple[Any, ...]:
            c.multimodal_scatter_forward(d.embeds, d.ids, list(d.features), token_ids, scalar, out=out)
            if fwd:
                return (out,)
            d_embeds, d_features = c.multimodal_scatter_backward(d.d_out, d.ids, rows, token_ids, scalar, out=grads)
            return (out, d_embeds, *d_features)

        return sandbox
    raise ValueError(impl)


def _check_equal(got: tuple[Any, ...], want: tuple[Any, ...], impl: str) -> None:
    """Untimed: a benchmark of a wrong result is worthless, and a copy has no round-off to excuse."""
    assert len(got) == len(want), impl
    for name, a, b in zip(("out", "d_embeds", "d_audio", "d_image", "d_video"), got, want):
        assert np.array_equal(to_numpy(a), to_numpy(b)), f"{impl} {name} differs from the fast path"


def _traffic_bytes(d: Inputs, direction: str) -> int:
    tokens, rows = d.ids.size, sum(len(f) for f in d.features)
    floats = 2 * tokens * HIDDEN if direction == "fwd" else 4 * tokens * HIDDEN + rows * HIDDEN
    return 4 * floats + d.ids.nbytes


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_multimodal_scatter(benchmark: Any, inputs: Inputs, direction: str, impl: str) -> None:
    assert MultimodalScatter().backend == "cpu_kernel", explain()  # else the "kernel" rows would time the reference
    d = inputs
    rows = {name: len(f) for name, f in zip(MODALITIES, d.features)}
    benchmark.group = (
        f"multimodal scatter {direction}, {d.ids.size} tokens x {HIDDEN}, feature rows "
        f"{', '.join(f'{k} {v}' for k, v in rows.items())}, fp32"
    )
    fn = _callable(impl, direction, d)

    want = _callable(SANDBOX_FAST, direction, d)()
    _check_equal(fn(), want, impl)  # first call: compiles the jit rows
    per_call = best_seconds(fn, repeats=1, warmup=0)
    # A budget of about 1.5 s per row, between 3 and 15 rounds: the slow references get few, the kernels many.
    rounds = int(min(15, max(3, 1.5 // max(per_call, 1e-3))))
    busy = wait_for_quiet()
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    # GB/s and the ratios are derived from the minima when the JSON is written (conftest -> report.add_derived).
    benchmark.extra_info.update(
        section="Multimodal scatter (memory-bound: GB/s, not a fraction of the GEMM peak)",
        impl=impl,
        compare=COMPARE.get(impl, {}),
        headline=impl in HEADLINE,
        bytes=_traffic_bytes(d, direction),
        details={"CPU busy before, %": 100 * busy},
        note=NOTE,
    )
