"""Where the compiled parts live: ``omni_fast._C`` and the MindSpore custom-op library beside it.

Both are installed inside the package by CMake. The custom-op library is found next to ``_C``'s file, never
from the current directory, because ``ops.Custom(func_type="aot")`` needs an absolute path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from mindspore import ops

KERNELS_LIBRARY = "libomni_fast_kernels.so"


class KernelsUnavailable(RuntimeError):
    """The compiled parts of omni_fast are missing (the package was not built with ``pip install``)."""


@functools.cache
def host_module() -> ModuleType:
    try:
        from omni_fast import _C
    except ImportError as err:
        raise KernelsUnavailable(
            f"omni_fast's compiled module is not built ({err}); install the package with `pip install -e .`"
        ) from err
    return _C


@functools.cache
def kernels_library() -> Path:
    path = Path(host_module().__file__).resolve().parent / KERNELS_LIBRARY
    if not path.is_file():
        raise KernelsUnavailable(f"{path} is missing; reinstall omni_fast with `pip install -e .`")
    return path


def aot_entry(function: str) -> str:
    """The ``ops.Custom`` func string for an entry point of the kernels library."""
    return f"{kernels_library()}:{function}"


def aot_op(function: str, like: Callable, bprop: Callable | None = None) -> ops.Custom:
    """An aot custom op on an entry point of the kernels library whose outputs are shaped and typed like some of its
    inputs: ``like`` maps the inputs to those outputs, and MindSpore calls it once with the input shapes (giving the
    output shapes) and once with the input dtypes (giving the output dtypes)."""
    return ops.Custom(aot_entry(function), out_shape=like, out_dtype=like, func_type="aot", bprop=bprop)
