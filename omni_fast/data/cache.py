"""The preprocessing cache: encoded samples stored as numpy arrays in safetensors shards under ``cache_dir``.

Layout (one directory per key)::

    cache_dir/omni_fast-<key[:20]>/manifest.json          written last: the key, its parts, shard list, skip counts
    cache_dir/omni_fast-<key[:20]>/shard-00000.safetensors records [0, preprocessing_batch_size) ...
    cache_dir/omni_fast-<key[:20]>.lock                    flock: one process builds, the others wait and reuse

* The key (:func:`cache_key`) is a sha256 over the data files (path, size, mtime), every media file the records
  name (path, size, mtime), the ``dataset_param`` section of data.json (canonical JSON, minus the keys that cannot
  change a sample), the processor's settings and tokenizer / processor files (path, size, mtime), and the source
  of the modules that encode samples — change any of them and a new directory is used.
* Every file is written under a unique temporary name in the same directory and ``os.replace``-d into place, so a
  reader sees a complete file or none; two processes writing the same shard write identical bytes. The lock only
  avoids doing the work twice; correctness does not depend on it (it may be unavailable on network file systems).
* A shard holds, per field of the sample dataclass, the flattened values of all its samples concatenated
  (``<field>``), their shapes (``<field>.shape``, ``-1``-padded; a ``None`` value has ndim -1) and kinds in the
  metadata; strings and lists of numbers go into the JSON metadata; no pickle. Shards are memory-mapped and a
  sample is sliced out on access, so a cached dataset opens in milliseconds whatever its size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CACHE_FORMAT",
    "PreprocessCache",
    "ShardReader",
    "cache_key",
    "processor_files",
    "read_shard",
    "write_shard",
]

CACHE_FORMAT = 1  # bump when the shard layout changes

# basic_parameters keys that cannot change an encoded sample (they tune how or where the work is done)
_KEY_NEUTRAL = ("cache_dir", "preprocessing_num_workers", "overwrite_cache", "preprocessing_batch_size")

# modules whose code decides the bytes of a sample; their source is part of the key
_ENCODER_MODULES = ("dataset", "template", "processor", "media", "cache")


def _file_state(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def processor_files(model_dir: str) -> list:
    """(path, size, mtime) of the tokenizer and processor files of a model directory (its .json and .txt files;
    weights are not read by preprocessing). Empty when ``model_dir`` is not a directory."""
    if not os.path.isdir(model_dir):
        return []
    return [_file_state(str(p)) for p in sorted(Path(model_dir).iterdir()) if p.suffix in (".json", ".txt")]


def _code_digest() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _ENCODER_MODULES:
        h.update(name.encode())
        h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()


def cache_key(
    data_files: Sequence[str], media_files: Sequence[str], dataset_param: dict, processor_settings: dict
) -> tuple[str, dict]:
    """(sha256 hex key, the parts it was made of) for a preprocessing run; see the module doc."""
    param = json.loads(json.dumps(dataset_param))
    basic = param.get("basic_parameters") or {}
    for k in _KEY_NEUTRAL:
        basic.pop(k, None)
    media_digest = hashlib.sha256()
    for path in sorted(set(media_files)):
        media_digest.update(json.dumps(_file_state(path)).encode())
    parts = {
        "format": CACHE_FORMAT,
        "code": _code_digest(),
        "data_files": [_file_state(p) for p in data_files],
        "media_files": media_digest.hexdigest(),
        "dataset_param": param,
        "processor": processor_settings,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return key, parts


# ---------------------------------------------------------------------------------------------------- shards


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then ``os.replace`` onto ``path``: a reader sees the old file, the new one, or none."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _kind(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (np.ndarray, np.generic)):
        return "array"
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value)
    ):
        return "json"
    raise TypeError(
        f"cannot store a {type(value).__name__} in the cache (arrays, scalars, strings, lists of numbers or strings)"
    )


def write_shard(path: Path, samples: Sequence[Any], meta: dict) -> None:
    """Store dataclass ``samples`` (all of one class) and ``meta`` (JSON-able) atomically at ``path``."""
    from safetensors.numpy import save_file

    cls = type(samples[0]) if samples else None
    tensors: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    dtypes_out: dict[str, str] = {}
    json_fields: dict[str, list] = {}
    for f in dataclasses.fields(cls) if cls else ():
        values = [getattr(s, f.name) for s in samples]
        present = {_kind(v) for v in values} - {"none"}
        if len(present) > 1:
            raise TypeError(f"field {f.name} mixes kinds {sorted(present)} across samples")
        kind = present.pop() if present else "none"
        kinds[f.name] = kind
        if kind == "json":
            json_fields[f.name] = values
            continue
        if kind == "none":
            continue
        arrays = [None if v is None else np.asarray(v) for v in values]
        dtypes = {a.dtype for a in arrays if a is not None}
        if len(dtypes) > 1:
            raise TypeError(f"field {f.name} has several dtypes across samples: {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        dtypes_out[f.name] = dtype.str
        ndim = max(a.ndim for a in arrays if a is not None)
        shapes = np.full((len(arrays), max(ndim, 1) + 1), -1, dtype=np.int64)
        for i, a in enumerate(arrays):
            if a is not None:
                shapes[i, 0] = a.ndim
                shapes[i, 1 : 1 + a.ndim] = a.shape
        flat = [a.reshape(-1) for a in arrays if a is not None]
        tensors[f.name] = np.ascontiguousarray(np.concatenate(flat) if flat else np.zeros(0, dtype))
        tensors[f"{f.name}.shape"] = shapes
    header = {
        "format": CACHE_FORMAT,
        "class": f"{cls.__module__}.{cls.__qualname__}" if cls else None,
        "count": len(samples),
        "kinds": kinds,
        "dtypes": dtypes_out,
        "json": json_fields,
        "meta": meta,
    }
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"omni_fast": json.dumps(header)}))


class ShardReader:
    """A memory-mapped shard; ``get(i, cls)`` rebuilds sample ``i`` as a ``cls`` instance."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(str(path), framework="numpy")
        header = json.loads(self._file.metadata()["omni_fast"])
        if header.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: cache format {header.get('format')}, expected {CACHE_FORMAT}")
        self.header = header
        self.count: int = header["count"]
        self.meta: dict = header["meta"]
        self._shapes: dict[str, np.ndarray] = {}
        self._offsets: dict[str, np.ndarray] = {}
        for name, kind in header["kinds"].items():
            if kind in ("array", "bool", "int", "float"):
                shapes = self._file.get_tensor(f"{name}.shape")
                ndim = shapes[:, :1]
                dims = np.where(np.arange(shapes.shape[1] - 1) < ndim, shapes[:, 1:], 1)
                sizes = np.where(ndim[:, 0] >= 0, np.prod(dims, axis=1), 0)  # None (ndim -1) has no values
                self._shapes[name] = shapes
                self._offsets[name] = np.concatenate([[0], np.cumsum(sizes)])

    def shapes(self, name: str) -> np.ndarray:
        """[count, 1 + max ndim] table of an array field: ndim (-1 for None) then the dims (-1 padded)."""
        return self._shapes[name]

    def fields(self, i: int, skip: Sequence[str] = ()) -> dict[str, Any]:
        """The field values of sample ``i``; fields named in ``skip`` are not read and come back as None."""
        if not 0 <= i < self.count:
            raise IndexError(f"{self.path}: sample {i} out of range [0, {self.count})")
        out: dict[str, Any] = {}
        for name, kind in self.header["kinds"].items():
            if kind == "none" or name in skip:
                out[name] = None
            elif kind == "json":
                out[name] = self.header["json"][name][i]
            else:
                shape = self._shapes[name][i]
                if shape[0] < 0:
                    out[name] = None
                    continue
                lo, hi = int(self._offsets[name][i]), int(self._offsets[name][i + 1])
                dims = tuple(int(d) for d in shape[1 : 1 + shape[0]])
                if lo == hi:  # safetensors cannot slice an empty range at the end of a tensor
                    value = np.zeros(dims, np.dtype(self.header["dtypes"][name]))
                else:
                    value = self._file.get_slice(name)[lo:hi].reshape(dims)
                out[name] = value.item() if kind in ("bool", "int", "float") else value
        return out

    def get(self, i: int, cls: type) -> Any:
        return cls(**self.fields(i))


def read_shard(path: Path, cls: type) -> list[Any]:
    """Every sample of a shard (tests and tools; the dataset reads lazily through :class:`ShardReader`)."""
    reader = ShardReader(path)
    return [reader.get(i, cls) for i in range(reader.count)]


# ---------------------------------------------------------------------------------------------------- cache


class PreprocessCache:
    """The cache directory of one key: shard paths, the manifest, and the build lock."""

    MANIFEST = "manifest.json"

    def __init__(self, cache_dir: str | os.PathLike, key: str, key_parts: dict):
        self.root = Path(cache_dir)
        self.key = key
        self.key_parts = key_parts
        self.dir = self.root / f"omni_fast-{key[:20]}"

    def shard_path(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}.safetensors"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive while held: the first process builds, the others wait, then find the manifest."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"omni_fast-{self.key[:20]}.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:  # e.g. a file system without locks: atomic writes still keep the cache valid
                pass
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(f, fcntl.LOCK_UN)

    def manifest(self) -> dict | None:
        """The manifest when the cache for this key is complete, else None."""
        path = self.dir / self.MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("key") != self.key or manifest.get("format") != CACHE_FORMAT:
            return None
        if not all((self.dir / s["file"]).is_file() for s in manifest["shards"]):
            return None
        return manifest

    def write_manifest(self, shards: list[dict], extra: dict) -> dict:
        manifest = {"format": CACHE_FORMAT, "key": self.key, "key_parts": self.key_parts, "shards": shards, **extra}
        text = json.dumps(manifest, indent=1, default=str)
        _atomic_write(self.dir / self.MANIFEST, lambda tmp: Path(tmp).write_text(text))
        return manifest

    def clear(self) -> None:
        """Forget this key's manifest (``overwrite_cache``); shards are then rewritten in place."""
        with contextlib.suppress(FileNotFoundError):
            (self.dir / self.MANIFEST).unlink()
