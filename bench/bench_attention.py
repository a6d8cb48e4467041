"""Flash attention forward and forward+backward at the three towers' shapes: our kernel vs the composed MindSpore
reference vs torch's CPU flash kernel, in one run.

Cases (fp32):

* LLM: B 1, 28 query / 4 key-value heads (GQA 7:1), head dim 128, causal, S = 1k, 4k, 8k (BNSD);
* vision windows: TND, 256 segments of 64 tokens (16k tokens), 16 heads, head dim 80, not causal;
* audio chunks: TND, 20 segments of 100 tokens (2000 tokens, 40 s of audio), 20 heads, head dim 64, not causal.

Rows per case (a case = shape x direction, one pytest-benchmark group):

* MindSpore kernel: the ``FlashAttention`` cell with the ``cpu_kernel`` backend (our aot op + its bprop), in
  PyNative and compiled with ``ms.jit`` (as the trainer runs it: PyNative autodiff adds ~20 ms of framework work per
  fwd+bwd call, which matters for the short cases);
* MindSpore reference, PyNative and jit: the same cell on the ``reference`` backend (dense scores, one boolean
  mask, MindSpore autodiff); jit is its faster form, PyNative its leaner one. Skipped where its S x S buffers would
  not fit in the RAM free at that moment;
* torch SDPA: ``torch.nn.functional.scaled_dot_product_attention`` (the peer: torch's CPU flash kernel). For TND it
  gets the equivalent block-diagonal work, the equal-length segments as a batch.

FLOPs count the attended (query, key) pairs only: 4 * pairs * D * heads forward (QK^T and PV), 2.5 times that
for the backward (five GEMMs instead of two). Memory is the analytic working set beyond inputs and outputs (what
each implementation allocates for itself), not a measurement: RSS deltas of one process are dominated by
MindSpore's and torch's memory pools.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
import pytest
import torch
from harness import alternating_minima, best_seconds, check_close, ms_sync, wait_for_quiet
from mindspore import Tensor, nn, ops

from omni_fast.ops.attention import FlashAttention, explain

RAM_BUDGET = 16 * 2**30  # the reference's fp32 score-sized buffers must fit here (the VM has 23 GiB, shared)


@dataclass(frozen=True)
class Case:
    heads: int
    kv_heads: int
    head_dim: int
    seq: int  # BNSD: S; TND: tokens
    segment: int | None = None  # TND: every segment has this length

    @property
    def layout(self) -> str:
        return "BNSD" if self.segment is None else "TND"

    @property
    def pairs(self) -> int:
        """Attended (query, key) pairs per head."""
        if self.segment is None:
            return self.seq * (self.seq + 1) // 2  # causal
        return self.seq * self.segment

    def flops(self, direction: str) -> float:
        forward = 4.0 * self.pairs * self.head_dim * self.heads
        return forward if direction == "fwd" else 3.5 * forward


CASES = {  # smallest reference footprint first (see the test's parametrisation)
    "LLM S=1k": Case(28, 4, 128, 1024),
    "audio 100-token chunks": Case(20, 20, 64, 2000, segment=100),
    "vision 64-token windows": Case(16, 16, 80, 16384, segment=64),
    "LLM S=4k": Case(28, 4, 128, 4096),
    "LLM S=8k": Case(28, 4, 128, 8192),
}
DIRECTIONS = ("fwd", "fwd+bwd")
MS_KERNEL = "MindSpore kernel (PyNative)"
MS_KERNEL_JIT = "MindSpore kernel (jit)"
MS_REFERENCE = "MindSpore reference (PyNative)"
MS_REFERENCE_JIT = "MindSpore reference (jit)"
TORCH = "torch SDPA"
IMPLS = (MS_KERNEL, MS_KERNEL_JIT, TORCH, MS_REFERENCE, MS_REFERENCE_JIT)
_VS_ALL = {"vs reference (jit)": MS_REFERENCE_JIT, "vs reference (PyNative)": MS_REFERENCE, "vs torch (peer)": TORCH}
COMPARE = {
    MS_KERNEL: _VS_ALL,
    MS_KERNEL_JIT: _VS_ALL,
    MS_REFERENCE: {"vs torch (peer)": TORCH},
    MS_REFERENCE_JIT: {"vs torch (peer)": TORCH},
}
# Score-sized fp32 buffers the composed reference holds at once (scores, scaled, biased, probabilities; the
# backward adds dP, dS and autodiff copies). Under ms.jit the graph keeps all of them: the LLM S=4k forward peaked
# at ~17 GiB used (~8 buffers of 1.9 GiB); its fwd+bwd and 4000 audio tokens x 20 heads fwd+bwd were killed for
# lack of memory. PyNative frees each intermediate once used.
REFERENCE_BUFFERS = {MS_REFERENCE: {"fwd": 4, "fwd+bwd": 8}, MS_REFERENCE_JIT: {"fwd": 8, "fwd+bwd": 12}}
NOTE = (
    "fwd+bwd is the vector-Jacobian product given dout -> (dq, dk, dv) (`GradOperation(sens_param=True)`; torch: "
    "`torch.autograd.grad` with dout). Ours run "
    "both in PyNative (launch_blocking) and under ms.jit, and so does the reference. torch "
    "SDPA gets `is_causal=True, enable_gqa=True` for the LLM and the segments as a batch for TND. FLOPs: attended "
    "pairs only (causal half), backward = 2.5x forward. Memory = analytic working set beyond inputs and outputs "
    "(ours from the kernel's buffers; the reference's from its score-sized buffers, see REFERENCE_BUFFERS; not "
    "modelled for torch). "
    "Before timing, each row's outputs are checked against our kernel (relative 1e-4), untimed. The machine is "
    "shared: minima over rounds, and 'CPU busy before' says how loaded it was when the rounds started."
)


def _mib(n_floats: float) -> float:
    return 4.0 * n_floats / 2**20


def working_set_mib(case: Case, impl: str, direction: str) -> float | None:
    """Analytic extra memory (MiB) beyond inputs and outputs; None for torch (its internals are not modelled)."""
    pad = -(-case.head_dim // 16) * 16
    threads = 2
    if impl in (MS_KERNEL, MS_KERNEL_JIT):
        # forward: per thread, the 128-row query block and output accumulator of each query head of the GQA group,
        # one packed K^T / V block and the score tile. backward: per work item (segment, kv head), Q, dO and a dQ
        # accumulator for the group's query heads (float32), per-row lse / Delta, and per-thread tiles.
        group = case.heads // case.kv_heads
        rows = case.seq if case.segment is None else case.segment
        forward = threads * (2 * group * 128 * pad + 128 * 2 * pad + 128 * 128)
        backward = threads * (group * rows * (3 * pad + 2) + 5 * 128 * pad + 2 * 128 * 128)
        return _mib(forward if direction == "fwd" else forward + backward)
    if impl in (MS_REFERENCE, MS_REFERENCE_JIT):
        # dense [N, Sq, Skv] scores and probabilities; autodiff keeps them and adds dP, dS (see REFERENCE_BUFFERS).
        return reference_bytes(case, direction, impl) / 2**20
    return None


def reference_bytes(case: Case, direction: str, impl: str) -> float:
    return REFERENCE_BUFFERS[impl][direction] * 4.0 * case.heads * case.seq * case.seq


def available_bytes() -> float:
    """MemAvailable now: the machine is shared, other sessions' tests and builds use RAM too."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return 1024.0 * int(line.split()[1])
    return float(RAM_BUDGET)


def attention_op(case: Case, backend: str) -> FlashAttention:
    """The face's cell for this case on ``backend`` (``cpu_kernel`` or ``reference``, forced as the env would)."""
    mode = 2 if case.segment is None else 0
    saved = os.environ.get("OMNI_FAST_BACKEND")
    os.environ["OMNI_FAST_BACKEND"] = backend
    try:
        return FlashAttention(case.heads, case.head_dim**-0.5, case.layout, sparse_mode=mode)
    finally:
        if saved is None:
            del os.environ["OMNI_FAST_BACKEND"]
        else:
            os.environ["OMNI_FAST_BACKEND"] = saved


class Step(nn.Cell):
    """One timed call: the forward, or the backward given dout (a vector-Jacobian product, with its forward).

    ``construct(q, k, v, dout, cu_q, cu_kv)``; the cumulative ends are None for BNSD. The backward is
    ``GradOperation(sens_param=True)``, dout fed as the output's gradient, as torch's ``autograd.grad(out, .., dout)``:
    differentiating ``sum(out * dout)`` instead would time MindSpore's multiply and reduction of the whole output too
    (~85 ms of PyNative time on the vision case).
    """

    def __init__(self, op: FlashAttention, backward: bool):
        super().__init__()
        self.op = op
        self.backward = backward
        self.vjp = ops.GradOperation(get_all=True, sens_param=True)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_kv: Tensor) -> Tensor:
        return self.op(q, k, v, cu_q, cu_kv)

    def construct(self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, cu_q=None, cu_kv=None) -> tuple:
        if self.backward:
            return self.vjp(self.forward)(q, k, v, cu_q, cu_kv, dout)[:3]
        return (self.op(q, k, v, cu_q, cu_kv),)


class JitStep(Step):
    @ms.jit
    def construct(self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, cu_q=None, cu_kv=None) -> tuple:
        return super().construct(q, k, v, dout, cu_q, cu_kv)


@dataclass
class Inputs:
    arrays: tuple[np.ndarray, ...]  # q, k, v, dout
    ms_args: tuple[Any, ...]  # q, k, v, dout, cu_q, cu_kv (None, None for BNSD)


def make_inputs(case: Case) -> Inputs:
    rng = np.random.default_rng(0)
    if case.segment is None:
        q_shape, kv_shape = (1, case.heads, case.seq, case.head_dim), (1, case.kv_heads, case.seq, case.head_dim)
    else:
        q_shape, kv_shape = (case.seq, case.heads, case.head_dim), (case.seq, case.kv_heads, case.head_dim)
    q, do = (rng.standard_normal(q_shape, dtype=np.float32) for _ in range(2))
    k, v = (rng.standard_normal(kv_shape, dtype=np.float32) for _ in range(2))
    cu = None
    if case.segment is not None:
        cu = Tensor(np.arange(case.segment, case.seq + 1, case.segment, dtype=np.int64))
    return Inputs((q, k, v, do), (Tensor(q), Tensor(k), Tensor(v), Tensor(do), cu, cu))


def _torch_callable(case: Case, d: Inputs, direction: str) -> Callable[[], tuple[Any, ...]]:
    q, k, v, do = (torch.from_numpy(a) for a in d.arrays)
    if case.segment is not None:  # the segments as a batch: [n, heads, segment, D]

        def batched(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, case.segment, x.shape[1], x.shape[2]).transpose(1, 2).contiguous()

        q, k, v, do = batched(q), batched(k), batched(v), batched(do)
    kwargs = {"is_causal": True, "enable_gqa": True} if case.segment is None else {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if direction == "fwd":
        return lambda: (sdpa(q, k, v, **kwargs),)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]

    def fwd_bwd() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(sdpa(*leaves, **kwargs), leaves, do)

    return fwd_bwd


def _to_layout(case: Case, x: Any) -> np.ndarray:
    """Outputs as numpy in our layout (torch's TND rows come back batched)."""
    if isinstance(x, Tensor):
        return x.asnumpy()
    a = x.detach().numpy()
    if case.segment is not None:
        a = a.transpose(0, 2, 1, 3).reshape(-1, a.shape[1], a.shape[3])
    return a


_STEPS: dict[tuple[str, str, str], Step] = {}
# Kernel rows up to this time per call also time torch in alternating calls (see harness.alternating_minima); the
# longer LLM cases would double the run's length for it.
ALTERNATE_MAX_SECONDS = 0.5


def _callable(name: str, impl: str, direction: str, d: Inputs) -> Callable[[], tuple[Any, ...]]:
    case = CASES[name]
    if impl == TORCH:
        return _torch_callable(case, d, direction)
    key = (name, impl, direction)
    if key not in _STEPS:
        _STEPS.clear()  # the reference's compiled graphs hold S x S buffers: keep one step alive
        backend = "cpu_kernel" if impl in (MS_KERNEL, MS_KERNEL_JIT) else "reference"
        step_type = JitStep if impl in (MS_KERNEL_JIT, MS_REFERENCE_JIT) else Step
        _STEPS[key] = step_type(attention_op(case, backend), direction != "fwd")
    step = _STEPS[key]
    return lambda: ms_sync(step(*d.ms_args))


_INPUTS: dict[str, Inputs] = {}


def inputs_for(name: str) -> Inputs:
    if name not in _INPUTS:
        _INPUTS.clear()  # one case resident at a time
        _INPUTS[name] = make_inputs(CASES[name])
    return _INPUTS[name]


_WANT: dict[tuple[str, str], tuple[np.ndarray, ...]] = {}


# Implementation is the slowest-varying parameter (pytest varies the decorator nearest the function slowest), and
# the reference comes last, smallest case first, forward before backward: a jit graph keeps its memory for the
# whole process (the S=4k reference forward holds ~12.6 GiB of RSS afterwards; gc and ms.runtime.empty_cache() do
# not return it), so anything after it would run short of RAM.
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark: Any, name: str, direction: str, impl: str) -> None:
    case = CASES[name]
    assert attention_op(case, "cpu_kernel").backend == "cpu_kernel", explain()
    if impl in (MS_REFERENCE, MS_REFERENCE_JIT):
        need, budget = reference_bytes(case, direction, impl), min(RAM_BUDGET, 0.85 * available_bytes())
        if need > budget:
            pytest.skip(
                f"the composed reference needs ~{need / 2**30:.0f} GiB of S x S buffers, {budget / 2**30:.0f} free"
            )
    d = inputs_for(name)
    benchmark.group = f"attention {direction}, {name} fp32"
    if (name, direction) not in _WANT:
        _WANT.clear()
        _WANT[(name, direction)] = tuple(_to_layout(case, x) for x in _callable(name, MS_KERNEL, direction, d)())
    fn = _callable(name, impl, direction, d)
    # The first call compiles the jit rows; checked untimed (outputs: out, or dq, dk, dv).
    check_close([_to_layout(case, x) for x in fn()], _WANT[(name, direction)], impl)
    per_call = best_seconds(fn, repeats=1, warmup=0)
    # Up to a second of untimed calls first: MindSpore's PyNative autograd took ~15 calls to settle on the audio
    # case (40 -> 33 ms per call in one process).
    for _ in range(int(min(30, 1.0 // per_call))):
        fn()
    rounds = int(min(10, max(3, 3.0 // max(per_call, 1e-3))))
    busy = wait_for_quiet()
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
    details = {"CPU busy before, %": 100 * busy}
    if impl in (MS_KERNEL, MS_KERNEL_JIT) and per_call <= ALTERNATE_MAX_SECONDS:
        ours, peer = alternating_minima(fn, _callable(name, TORCH, direction, d), rounds)
        details["vs torch, alternating calls"] = round(peer / ours, 2)
    mib = working_set_mib(case, impl, direction)
    if mib is not None:
        details["working set MiB (analytic)"] = round(mib, 1)
    benchmark.extra_info.update(
        section="Flash attention (compute-bound: GFLOP/s and % of the GEMM peak)",
        impl=impl,
        compare=COMPARE.get(impl, {}),
        headline=impl in (MS_KERNEL, MS_KERNEL_JIT),
        flops=case.flops(direction),
        details=details,
        note=NOTE,
    )
