"""Test session setup: MindSpore on CPU in PyNative with launch blocking (4-6x faster than async on 2 cores)."""

from __future__ import annotations

import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from omni_fast.ops import dispatch

sys.path.insert(0, str(Path(__file__).parent))

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
dispatch.configure_cpu_runtime()  # as `python -m omni_fast.train` runs: graph kernels launched in order
ms.runtime.launch_blocking()


def assert_rel_close(actual, expected, rtol: float, name: str = "") -> None:
    """max|a - e| <= rtol * max|e| (a scale-aware bound that does not explode on entries near zero)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    err = np.abs(actual - expected).max(initial=0.0)
    assert err <= rtol * scale, f"{name}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3e}"


@pytest.fixture(scope="session")
def hf_tiny():
    """The tiny transformers thinker (seeded), built once per session."""
    from tiny_omni import build_hf_thinker

    return build_hf_thinker()
