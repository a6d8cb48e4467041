"""Shared helpers of the benchmark suite: machine description, same-run GEMM peak and copy bandwidth, syncing.

Heavy imports (mindspore, torch) stay inside the functions so that ``report.py`` can import nothing from here
and this module stays cheap to import.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Row labels shared by the kernel benchmarks: our op through MindSpore (PyNative and jit), and the C++ sandbox.
MS_KERNEL = "MindSpore kernel (PyNative)"
MS_KERNEL_JIT = "MindSpore kernel (jit)"
SANDBOX_FAST = "C++ fast path (numpy sandbox)"
SANDBOX_SCALAR = "C++ scalar reference (numpy sandbox)"


# How the fused-kernel benchmarks (RMSNorm, activations, LayerNorm, rotary) time their rows; each appends its
# op's outputs and compulsory traffic.
KERNEL_METHOD_NOTE = (
    "MindSpore rows run in PyNative with launch_blocking; the jit rows compile the same call with `ms.jit`. "
    "fwd+bwd is `ms.vjp` with a given dy, returning y and the gradients (y too, so that jit cannot drop the "
    "forward), and `torch.autograd.grad` for torch. The sandbox calls `omni_fast._C` on numpy arrays: fast path "
    "with OpenMP (2 threads), scalar reference single-threaded; it allocates fresh outputs per call, as torch does, "
    "while MindSpore reuses its memory pool. Before timing, every row's outputs are checked against the fast path "
    "(relative 1e-4), untimed. "
)


def kernel_rows(reference: str, reference_jit: str, torch: str) -> tuple[tuple[str, ...], dict, set[str]]:
    """(rows, ratio columns per row, headline rows) of a kernel benchmark timing our op, its MindSpore reference (each
    in PyNative and under jit), the torch peer and the sandbox's fast path and scalar reference."""
    rows = (MS_KERNEL, reference, MS_KERNEL_JIT, reference_jit, torch, SANDBOX_FAST, SANDBOX_SCALAR)
    compare = {
        MS_KERNEL: {"vs its reference": reference, "vs torch (peer)": torch},
        MS_KERNEL_JIT: {"vs its reference": reference_jit, "vs torch (peer)": torch},
        reference: {"vs torch (peer)": torch},
        reference_jit: {"vs torch (peer)": torch},
        SANDBOX_FAST: {"vs its reference": SANDBOX_SCALAR, "vs torch (peer)": torch},
    }
    return rows, compare, {MS_KERNEL, MS_KERNEL_JIT}


def best_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` calls (the machine is shared: the minimum is the signal)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def alternating_minima(fn_a: Callable[[], Any], fn_b: Callable[[], Any], rounds: int) -> tuple[float, float]:
    """Minimum wall times of ``fn_a()`` and ``fn_b()`` called alternately, ``rounds`` calls each.

    This VM's speed changes by up to ~25% for minutes at a time (other tenants of the host: the same C++ attention
    loop measured 9.6 and 12.5 ms in back-to-back processes). Rows timed one after the other can land in different
    phases; alternating calls put both sides in the same ones, so their ratio is the robust comparison."""
    best_a = best_b = float("inf")
    for _ in range(rounds):
        best_a = min(best_a, best_seconds(fn_a, repeats=1, warmup=0))
        best_b = min(best_b, best_seconds(fn_b, repeats=1, warmup=0))
    return best_a, best_b


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy_fraction(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds. Called while this process sleeps, it is the load of
    everything else on the machine."""
    busy0, total0 = _cpu_times()
    time.sleep(interval)
    busy1, total1 = _cpu_times()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_quiet(max_wait: float | None = None, threshold: float = 0.2, interval: float = 0.5) -> float:
    """Wait (at most ``max_wait`` s, default ``$OMNI_BENCH_IDLE_WAIT`` or 10) until other processes use less than
    ``threshold`` of the CPUs; return the last busy fraction seen. On a 2-core machine shared with test runs and
    builds, starting the timed rounds in a quiet moment matters more than any number of rounds."""
    if max_wait is None:
        max_wait = float(os.environ.get("OMNI_BENCH_IDLE_WAIT", "10"))
    deadline = time.monotonic() + max_wait
    while True:
        busy = cpu_busy_fraction(interval)
        if busy <= threshold or time.monotonic() >= deadline:
            return busy
        time.sleep(interval)


def _own_jiffies() -> int:
    """CPU time of this process (all threads), in the same clock ticks as /proc/stat."""
    stat = Path("/proc/self/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on; the name may contain spaces
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


class QuietRounds:
    """``benchmark.pedantic`` setup/teardown pair for a shared machine.

    Before each round (untimed) it waits for a quiet moment, spending at most ``budget`` seconds per benchmark in
    all, and it measures what share of the CPUs *other* processes used during the timed rounds (busy time of the
    whole machine minus this process's own CPU time), so a reader can tell a clean minimum from a noisy one.
    """

    def __init__(self, budget: float = 10.0) -> None:
        self.budget = budget
        self.others = 0
        self.total = 0
        self._start = (0, 0, 0)

    def setup(self) -> None:
        if self.budget > 0:
            started = time.monotonic()
            wait_for_quiet(min(self.budget, 2.0), interval=0.1)
            self.budget -= time.monotonic() - started
        self._start = (*_cpu_times(), _own_jiffies())

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        busy, total = _cpu_times()
        own = _own_jiffies()
        busy0, total0, own0 = self._start
        self.others += max(0, (busy - busy0) - (own - own0))
        self.total += total - total0

    @property
    def others_fraction(self) -> float:
        return self.others / self.total if self.total else 0.0


def run_rounds(benchmark: Any, fn: Callable[[], Any], rounds: int, warmup_rounds: int = 0) -> dict[str, float]:
    """``benchmark.pedantic(fn)`` started in a quiet moment, each round too; returns the detail columns describing
    the noise (other processes' CPU share while the rounds ran)."""
    wait_for_quiet()
    quiet = QuietRounds()
    benchmark.pedantic(
        fn, setup=quiet.setup, teardown=quiet.teardown, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1
    )
    return {"others' CPU while timed, %": 100 * quiet.others_fraction}


def run_budgeted(benchmark: Any, fn: Callable[[], Any], max_rounds: int = 15, budget_seconds: float = 1.5) -> dict:
    """``run_rounds`` with about ``budget_seconds`` of timed calls, between 3 and ``max_rounds`` rounds after one
    warm-up round: slow references get few rounds, the kernels many. Returns ``run_rounds``' noise columns."""
    per_call = best_seconds(fn, repeats=1, warmup=0)
    rounds = int(min(max_rounds, max(3, budget_seconds // max(per_call, 1e-3))))
    return run_rounds(benchmark, fn, rounds, warmup_rounds=1)


def check_close(got: Sequence[Any], want: Sequence[Any], impl: str, rtol: float = 1e-4) -> None:
    """Untimed sanity check before timing (a benchmark of a wrong result is worthless): each output's max abs error
    within ``rtol`` times the largest magnitude of the expected one, like tests' assert_rel_close."""
    assert len(got) == len(want), f"{impl}: {len(got)} outputs, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
        err, scale = np.abs(a - b).max(initial=0.0), np.abs(b).max(initial=0.0)
        assert err <= rtol * scale, f"{impl} output {i}: max abs err {err:.3e} vs scale {scale:.3e}"


def to_numpy(value: Any) -> np.ndarray:
    """A MindSpore or torch tensor (or anything array-like) as numpy, for the untimed correctness checks."""
    import mindspore as ms
    import torch

    if isinstance(value, ms.Tensor):
        return value.asnumpy()
    if isinstance(value, torch.Tensor):
        return value.detach().numpy()
    return np.asarray(value)


def ms_sync(out: Any) -> Any:
    """Wait for MindSpore outputs. A jit call can return before its graph has run (launch_blocking covers
    PyNative ops only); ``asnumpy`` blocks until the tensor is ready and is a zero-copy view on CPU."""
    import mindspore as ms

    if isinstance(out, ms.Tensor):
        out.asnumpy()
    elif isinstance(out, (tuple, list)):
        for item in out:
            ms_sync(item)
    return out


def _c_getenv(name: str) -> str | None:
    # mindspore sets OMP_NUM_THREADS=1 with C setenv() at import; os.environ does not see that, libc does.
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    value = libc.getenv(name.encode())
    return value.decode() if value is not None else None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> dict[str, Any]:
    """CPU, cores, flags, RAM, library versions and thread settings: what a number needs to be reproduced."""
    import torch

    from omni_fast.ops.library import host_module

    cpuinfo = Path("/proc/cpuinfo").read_text()

    def field(name: str) -> str:
        for line in cpuinfo.splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
        return "unknown"

    flags = set(field("flags").split())
    # One /proc/cpuinfo block per logical CPU; distinct (physical id, core id) pairs are the physical cores.
    blocks = [
        {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in part.splitlines() if ":" in line)}
        for part in cpuinfo.strip().split("\n\n")
    ]
    cores = {(block.get("physical id"), block.get("core id")) for block in blocks}
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return {
        "cpu_model": field("model name"),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "physical_cores": len(cores),
        "cpu_mhz": field("cpu MHz"),
        "flags": {name: name in flags for name in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")},
        "ram_gib": round(mem_kb / 2**20, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("mindspore", "torch", "numpy", "transformers", "omni_fast", "pytest-benchmark")
        },
        "omni_fast_build_info": dict(host_module().build_info()),
        "threads": {
            "torch": torch.get_num_threads(),
            "OMP_NUM_THREADS (C environment)": _c_getenv("OMP_NUM_THREADS"),
            "omni_fast kernels (omp_get_max_threads)": host_module().build_info()["openmp_max_threads"],
        },
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def measure_gemm(n: int = 2048, repeats: int = 8) -> dict[str, Any]:
    """fp32 n x n x n matmul GFLOP/s with all threads, torch and numpy (the peak is the better of the two), plus
    MindSpore's own matmul for information, and the machine's fp32 FMA ceiling (no GEMM reaches it). Outputs are
    preallocated so the number is the GEMM alone."""
    import mindspore as ms
    import torch

    from omni_fast.ops.library import host_module

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n**3
    out_np = np.empty((n, n), np.float32)
    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.empty((n, n))
    ma, mb = ms.Tensor(a), ms.Tensor(b)
    gflops = {
        "torch.matmul": flop / best_seconds(lambda: torch.matmul(ta, tb, out=tc), repeats) / 1e9,
        "numpy.matmul": flop / best_seconds(lambda: np.matmul(a, b, out=out_np), repeats) / 1e9,
        "mindspore ops.matmul (PyNative)": flop / best_seconds(lambda: ms_sync(ms.ops.matmul(ma, mb)), repeats) / 1e9,
    }
    source = max(("torch.matmul", "numpy.matmul"), key=gflops.get)
    return {
        "n": n,
        "repeats": repeats,
        "gflops": gflops,
        "peak_gflops": gflops[source],
        "peak_source": source,
        # Above any GEMM: independent multiply-add chains on every core, nothing loaded (omni_fast._C).
        "fma_ceiling_gflops": host_module().fma_peak_gflops(0.5),
    }


def measure_copy_bandwidth(mib: int = 64, repeats: int = 20) -> dict[str, Any]:
    """Copy GB/s of a ``mib`` MiB fp32 array (read + write counted, 2 x size / time): the floor for an op that reads
    and writes each element once. 64 MiB is the size of the RMSNorm benchmark's tensors (56 and 80 MiB), so the
    yardstick sees the same cache effects (larger than L2, close to an EPYC L3) as the op it judges."""
    import torch

    src = np.random.default_rng(0).standard_normal(mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    moved = 2.0 * src.nbytes
    gbs = {
        "numpy.copyto": moved / best_seconds(lambda: np.copyto(dst, src), repeats) / 1e9,
        "torch.Tensor.copy_": moved / best_seconds(lambda: tdst.copy_(tsrc), repeats) / 1e9,
    }
    return {"mib": mib, "gbs": gbs, "best_gbs": max(gbs.values())}
