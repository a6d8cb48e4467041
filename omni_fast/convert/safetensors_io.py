"""Safetensors headers: read one without touching the tensor bytes, and build one byte-identical to the library's.

The format: an 8-byte little-endian header length N, N bytes of JSON, then the raw tensor bytes. The compiled
conversion path writes files itself, and they must equal the ones the ``safetensors`` library (0.4 - 0.8, Rust
``serialize``) writes from the same tensors, so the header is built the way that library builds it:

* tensors are laid out, and listed, by dtype in descending order of the library's ``Dtype`` enum, then by name;
* the JSON is compact (no spaces), ``__metadata__`` first, non-ASCII left unescaped;
* the JSON is padded with spaces to a multiple of 8 bytes, so the data starts 8-byte aligned.

Metadata is always the single pair ``{"format": "pt"}`` (what torch, transformers and MindSpeed-MM write): the
library keeps metadata in a hash map, so with two or more keys its order, and the file's bytes, vary between runs.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The library's Dtype enum in ascending order (safetensors/src/tensor.rs); files list the highest first.
DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
               "I64", "U64")
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
# The dtypes conversion rules move (thinker weights); anything else is only copied through whole.
FLOAT_DTYPES = ("F32", "BF16", "F16")
METADATA = {"format": "pt"}
_NUMPY_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
                "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64"}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype; BF16 is MindSpore's numpy bfloat16 (numpy has none), so that
    ``ms.Tensor(array)`` is bf16 and ``safetensors.numpy`` writes BF16."""
    if dtype == "BF16":
        import mindspore as ms

        return np.dtype(ms.dtype_to_nptype(ms.bfloat16))
    if dtype not in _NUMPY_NAMES:
        raise ValueError(f"safetensors dtype {dtype} has no numpy equivalent here")
    return np.dtype(_NUMPY_NAMES[dtype])


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets) and what they hold."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, in file order, without reading their bytes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
    start = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: malformed header entry for {name!r}") from None
        if dtype not in ITEMSIZE:
            raise ValueError(f"{path}: {name} has dtype {dtype}, which this converter does not know")
        if e - b != math.prod(shape) * ITEMSIZE[dtype] or b < 0 or start + e > size:
            raise ValueError(f"{path}: {name}: data_offsets {[b, e]} do not fit shape {list(shape)} {dtype}")
        entries[name] = TensorEntry(name, dtype, shape, start + b, start + e)
    return dict(sorted(entries.items(), key=lambda kv: kv[1].begin))


def file_order(tensors: Iterable[tuple[str, str]]) -> list[str]:
    """Names of (name, dtype) pairs in the order the library lays them out."""
    return [name for name, _ in sorted(tensors, key=lambda t: (-DTYPE_ORDER.index(t[1]), t[0]))]


def build_header(tensors: Iterable[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """The first bytes of a safetensors file holding ``(name, dtype, shape)`` tensors, and each tensor's absolute
    data offset in that file. Byte-identical to what ``safetensors.serialize`` writes for the same tensors."""
    specs = {name: (dtype, tuple(shape)) for name, dtype, shape in tensors}
    header: dict[str, object] = {"__metadata__": METADATA}
    offsets = {}
    at = 0
    for name in file_order((name, dtype) for name, (dtype, _) in specs.items()):
        dtype, shape = specs[name]
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
        offsets[name] = at
        at += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {name: len(prefix) + off for name, off in offsets.items()}
