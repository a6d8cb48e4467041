"""Benchmark session setup: MindSpore context, the machine description and the same-run GEMM peak / copy bandwidth.

The yardsticks are measured when the session starts and again when the JSON is written (the machine is shared;
the better of the two is the capability), then stored in the ``--benchmark-json`` file under ``omni_fast``.
Ratios between implementations of one case and the GB/s / fraction-of-peak figures are derived there from the
run's own minima (``report.add_derived``), so every number in RESULTS.md comes from one process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mindspore as ms
import pytest

BENCH = Path(__file__).resolve().parent
# tests/ holds the tiny transformers config and the token-sequence builders; appended (not prepended) so that
# the module name "conftest" keeps meaning this file.
sys.path.append(str(BENCH.parent / "tests"))

from harness import describe_machine, measure_copy_bandwidth, measure_gemm, wait_for_quiet  # noqa: E402
from report import add_derived  # noqa: E402

from omni_fast.ops import dispatch  # noqa: E402

# PyNative with launch blocking: the default async launch is 4-6x slower on 2 cores (mindone_peer.md). The
# benchmarks that say "jit" compile their step with ms.jit on top of this.
ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
dispatch.configure_cpu_runtime()  # as `python -m omni_fast.train` runs: graph kernels launched in order
ms.runtime.launch_blocking()

SESSION: dict[str, Any] = {"gemm": [], "copy": []}


@pytest.fixture(scope="session", autouse=True)
def machine() -> dict[str, Any]:
    """What the numbers were measured on (autouse: every JSON carries it, whichever benchmarks ran)."""
    SESSION["machine"] = describe_machine()
    return SESSION["machine"]


@pytest.fixture(scope="session", autouse=True)
def gemm_peak(machine: dict[str, Any]) -> float:
    """Best fp32 2048^3 GEMM GFLOP/s of torch and numpy, measured now (measured again at the end)."""
    SESSION["gemm"].append({"when": "start", "cpu_busy_before": wait_for_quiet(), **measure_gemm()})
    return SESSION["gemm"][0]["peak_gflops"]


@pytest.fixture(scope="session", autouse=True)
def copy_bandwidth(machine: dict[str, Any]) -> float:
    """Best large-array copy GB/s, the yardstick for memory-bound ops (measured again at the end)."""
    SESSION["copy"].append({"when": "start", "cpu_busy_before": wait_for_quiet(), **measure_copy_bandwidth()})
    return SESSION["copy"][0]["best_gbs"]


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    if SESSION["gemm"] and len(SESSION["gemm"]) == 1:  # once, even if pytest-benchmark writes several files
        SESSION["gemm"].append({"when": "end", "cpu_busy_before": wait_for_quiet(), **measure_gemm()})
        SESSION["copy"].append({"when": "end", "cpu_busy_before": wait_for_quiet(), **measure_copy_bandwidth()})
        SESSION["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    output_json["omni_fast"] = {**SESSION, "command": " ".join(["python -m pytest", *config.invocation_params.args])}
    add_derived(output_json)
