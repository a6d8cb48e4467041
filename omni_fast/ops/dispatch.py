"""Which implementation serves an op, and why the others cannot.

Backends, in order of preference: ``ascend`` (MindSpore's native fused ops on an NPU), ``cpu_kernel`` (our C++
kernels through ``ops.Custom``), ``reference`` (plain MindSpore, always available). Each op's face asks every
backend for its reasons not to serve an input and takes the first with none; ``explain`` shows all reasons, like
xformers' dispatcher. ``OMNI_FAST_BACKEND=reference`` forces the reference (for debugging a kernel).

The choice is made when a layer is built, not per call, so ``construct`` stays compilable under ``ms.jit``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import mindspore as ms

logger = logging.getLogger(__name__)

BACKENDS = ("ascend", "cpu_kernel", "reference")


def device_target() -> str:
    return ms.get_context("device_target")


def ascend_available() -> bool:
    """Whether this MindSpore build can use an Ascend NPU (``mindspore.hal``'s own check)."""
    return bool(ms.hal.is_available("Ascend"))


# MindSpore's graph runtime launches every ready kernel from a pool of actor threads, so independent kernels (the
# dX and dW matmuls of a backward, q/k/v projections) run at the same time, each with its own threads. On a
# machine with a few cores they then fight over them: a chain of MLP layers forward+backward under ms.jit ran at
# 112-123 GFLOP/s this way and at 155-203 GFLOP/s with kernels launched in order from one host thread
# (2-core EPYC VM, 1024 x 512 x 1536 matmuls; bench/RESULTS.md has the whole training step). MindSpore reads the
# switch once, when its runtime starts.
HOST_BLOCKING_RUN = "MS_DEV_HOST_BLOCKING_RUN"


def configure_cpu_runtime() -> bool:
    """Run graph kernels in order on CPU (see above) unless the user set ``MS_DEV_HOST_BLOCKING_RUN`` already.

    Call before the first MindSpore graph runs; later it has no effect. Returns whether the switch is on. On an
    Ascend machine nothing is changed (its kernels run on device streams, which this does not concern).
    """
    if ascend_available():
        return os.environ.get(HOST_BLOCKING_RUN) == "1"
    os.environ.setdefault(HOST_BLOCKING_RUN, "1")
    return os.environ[HOST_BLOCKING_RUN] == "1"


def compute_dtype(param_dtype: ms.dtype) -> ms.dtype:
    """bf16 weights compute in bf16 on Ascend; MindSpore's CPU build has no bf16 kernels, so there fp32."""
    if param_dtype == ms.bfloat16 and device_target() != "Ascend":
        _warn_once(
            "bf16-on-cpu",
            f"bfloat16 requested on {device_target()}: weights stay bfloat16, compute runs in float32 "
            "(MindSpore has no bfloat16 kernels on this device)",
        )
        return ms.float32
    return param_dtype


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# What our C++ kernels take: float32, or bfloat16 storage computed in float32.
KERNEL_DTYPES = (ms.float32, ms.bfloat16)


def cpu_kernel_reasons(*dtypes: ms.dtype) -> list[str]:
    """Why our C++ kernels cannot serve tensors of ``dtypes`` here: another device, another dtype, no build."""
    why = needs_device("CPU")
    others = sorted({str(d) for d in dtypes if d not in KERNEL_DTYPES})
    if others:
        why.append(f"dtype {', '.join(others)} is not float32 or bfloat16")
    return why + kernels_built()


def kernel_backend_reasons(*dtypes: ms.dtype) -> dict[str, Callable[[], list[str]]]:
    """The reasons of an op whose Ascend backend takes any input and whose CPU kernel takes ``KERNEL_DTYPES``."""
    return {
        "ascend": lambda: needs_device("Ascend"),
        "cpu_kernel": lambda: cpu_kernel_reasons(*dtypes),
        "reference": lambda: [],
    }


def choose(op: str, reasons: dict[str, Callable[[], list[str]]]) -> str:
    """The first backend whose reason list is empty (``reasons`` maps backend -> callable giving the list)."""
    forced = os.environ.get("OMNI_FAST_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"OMNI_FAST_BACKEND={forced!r}: expected one of {', '.join(BACKENDS)}")
        why = reasons[forced]()
        if why:
            raise ValueError(f"OMNI_FAST_BACKEND={forced} cannot serve {op}: {'; '.join(why)}")
        return forced
    for backend in BACKENDS:
        if not reasons[backend]():
            return backend
    raise AssertionError(f"{op}: the reference backend refused an input")  # reference never refuses


def explain(reasons: dict[str, Callable[[], list[str]]]) -> str:
    lines = []
    for backend in BACKENDS:
        why = reasons[backend]()
        lines.append(f"{backend}: " + ("available" if not why else "; ".join(why)))
    return "\n".join(lines)


def needs_device(name: str) -> list[str]:
    device = device_target()
    return [] if device == name else [f"device is {device}, not {name}"]


def kernels_built() -> list[str]:
    from omni_fast.ops.library import KernelsUnavailable, kernels_library

    try:
        kernels_library()
    except KernelsUnavailable as err:
        return [str(err)]
    return []
