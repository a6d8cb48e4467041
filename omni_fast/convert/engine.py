"""Lowering of tensor moves to byte pieces, run by the compiled copy engine (``omni_fast._C.convert_copy``).

Every tensor is seen as a 2-D array ``[shape[0], prod(shape[1:])]`` (1-D tensors as one column), and every conversion
rule as rectangles copied between such arrays (:class:`Rect`). :class:`CopyPlan` turns a rectangle into one piece
(kernels/convert.h): ``rows`` runs of bytes at a source stride and a destination stride, collapsed into a single
contiguous run when it spans whole rows on both sides. When the plan runs, each sink is cut into units: windows of
``UNIT_BYTES`` at multiples of ``UNIT_BYTES`` of the sink, the parallel grain, with the pieces clipped to them.
Aligned windows make every write but a file's last start and end on a page boundary, so the kernel never zero-fills
part of a new page before the copy covers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from omni_fast.ops.library import host_module

UNIT_BYTES = 2 << 20  # per-unit costs vanish, 2-64 threads still balance (the engine writes it in 256 KiB pieces)

Target = Union[str, Path, bytes, bytearray, memoryview, np.ndarray]


@dataclass(frozen=True)
class Loc:
    """A tensor's bytes: index of its source (or sink), absolute byte offset, elements per row, bytes per element."""

    index: int
    offset: int
    cols: int
    itemsize: int


@dataclass(frozen=True)
class Rect:
    """``rows x cols`` elements read at (src_row, src_col) of ``src`` (None: zeros), written at (dst_row, dst_col)."""

    src: Loc | None
    src_row: int
    src_col: int
    dst_row: int
    dst_col: int
    rows: int
    cols: int


def row_cols(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D view of a tensor shape: (rows, elements per row)."""
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1


# (src or -1 for zeros, src offset, src stride, dst offset, dst stride, rows, row bytes), as kernels/convert.h
Piece = tuple[int, int, int, int, int, int, int]


def clip(piece: Piece, begin: int, end: int) -> list[Piece]:
    """The parts of ``piece`` that write into bytes [begin, end) of its sink (rows cut where the window cuts them)."""
    src, so, ss, do, ds, rows, rb = piece
    out: list[Piece] = []

    def part(row: int) -> None:  # row ``row`` alone, cut to the window
        a, b = max(do + row * ds, begin), min(do + row * ds + rb, end)
        if a < b:
            shift = a - do - row * ds
            out.append((src, so + row * ss + shift if src >= 0 else 0, b - a, a, b - a, 1, b - a))

    if rows == 1:
        part(0)
        return out
    first = max(0, (begin - do - rb) // ds + 1)  # rows meeting the window: first .. last - 1
    last = min(rows, (end - 1 - do) // ds + 1)
    if first >= last:
        return out
    lo = first if do + first * ds >= begin else first + 1  # rows wholly inside: lo .. hi - 1
    hi = last if do + (last - 1) * ds + rb <= end else last - 1
    for row in sorted({first, last - 1} - set(range(lo, hi))):
        part(row)
    if lo < hi:
        out.append((src, so + lo * ss if src >= 0 else 0, ss, do + lo * ds, ds, hi - lo, rb))
    return out


class CopyPlan:
    """Sources, sinks, units and pieces for one ``convert_copy`` call."""

    def __init__(self) -> None:
        self.sources: list[Any] = []
        self.sinks: list[tuple[Any, int]] = []
        self._paths: dict[str, int] = {}
        self._pieces: list[list[Piece]] = []  # per sink

    def source(self, target: Target) -> int:
        """Index of a source: a file path (memory-mapped by the engine; each path once) or a buffer."""
        if isinstance(target, (str, Path)):
            key = str(target)
            if key not in self._paths:
                self._paths[key] = len(self.sources)
                self.sources.append(key)
            return self._paths[key]
        self.sources.append(target)
        return len(self.sources) - 1

    def sink(self, target: Target, size: int) -> int:
        """Index of a sink of ``size`` bytes: a new file's path, or a writable buffer of exactly that size."""
        self.sinks.append((str(target) if isinstance(target, Path) else target, int(size)))
        self._pieces.append([])
        return len(self.sinks) - 1

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.sinks)

    def add_bytes(self, sink: int, offset: int, data: bytes) -> None:
        """Write ``data`` (e.g. a safetensors header) at ``offset`` of ``sink``."""
        self._pieces[sink].append((self.source(data), 0, len(data), offset, len(data), 1, len(data)))

    def add_tensor(self, sink: int, offset: int, shape: Sequence[int], itemsize: int, rects: Sequence[Rect]) -> None:
        """Fill the tensor of ``shape`` stored at ``offset`` of ``sink`` from ``rects`` (which must tile it)."""
        cols = row_cols(shape)[1]
        row_bytes = cols * itemsize
        for rect in rects:
            if rect.rows * rect.cols == 0:
                continue
            dst = offset + (rect.dst_row * cols + rect.dst_col) * itemsize
            if rect.src is None:
                src, src_off, src_stride = -1, 0, 0
            else:
                src, src_stride = rect.src.index, rect.src.cols * itemsize
                src_off = rect.src.offset + (rect.src_row * rect.src.cols + rect.src_col) * itemsize
            if rect.cols == cols and (rect.src is None or rect.src.cols == cols):
                nbytes = rect.rows * row_bytes  # whole rows on both sides: one contiguous run
                self._pieces[sink].append((src, src_off, nbytes, dst, nbytes, 1, nbytes))
            else:
                self._pieces[sink].append((src, src_off, src_stride, dst, row_bytes, rect.rows, rect.cols * itemsize))

    def units(self) -> tuple[np.ndarray, np.ndarray]:
        """The engine's arrays: units [n, 5] = (sink, begin, end, first piece, last piece), pieces [m, 7]."""
        units, pieces = [], []
        for sink, (_, size) in enumerate(self.sinks):
            windows: dict[int, list[Piece]] = {}
            for piece in self._pieces[sink]:
                _, _, _, do, ds, rows, rb = piece
                span_end = do + (rows - 1) * ds + rb
                for w in range(do // UNIT_BYTES, (span_end - 1) // UNIT_BYTES + 1):
                    windows.setdefault(w, []).extend(clip(piece, w * UNIT_BYTES, (w + 1) * UNIT_BYTES))
            for w in range((size + UNIT_BYTES - 1) // UNIT_BYTES):
                first = len(pieces)
                pieces.extend(sorted(windows.get(w, []), key=lambda p: p[3]))
                units.append((sink, w * UNIT_BYTES, min(size, (w + 1) * UNIT_BYTES), first, len(pieces)))
        return np.asarray(units, dtype=np.int64).reshape(-1, 5), np.asarray(pieces, dtype=np.int64).reshape(-1, 7)

    def run(self, threads: int = 0, reference: bool = False) -> None:
        """Execute in C++: ``threads`` OpenMP threads (0: all); ``reference`` runs the one-thread byte loops."""
        units, pieces = self.units()
        host_module().convert_copy(self.sources, self.sinks, units, pieces, threads=threads, reference=reference)
