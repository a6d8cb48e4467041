"""The compiled module's machine probes: how it was built, and the arithmetic ceiling the benchmarks report."""

from __future__ import annotations

import math

import pytest

from omni_fast.ops.library import host_module


def test_build_info_names_the_features_and_threads():
    info = host_module().build_info()
    assert set(info) == {"cpu_features", "arch_flags", "openmp_max_threads"}
    assert info["openmp_max_threads"] >= 1


def test_fma_peak_is_a_positive_rate():
    gflops = host_module().fma_peak_gflops(0.05)
    assert math.isfinite(gflops) and gflops > 0


@pytest.mark.parametrize("seconds", [0.0, -1.0, 11.0, math.nan])
def test_fma_peak_rejects_bad_durations(seconds):
    with pytest.raises(ValueError, match="seconds must be in"):
        host_module().fma_peak_gflops(seconds)
