"""Training checkpoints in Megatron's layout, written so that a crash never leaves a broken "latest".

``SAVE/iter_NNNNNNN/mp_rank_00[_PPP]/`` holds ``model.safetensors`` (the stage's weights in MindSpeed-MM's names
and layout, written by ``omni_fast.convert.write_mm_thinker``, so ``mm-convert mm_to_hf`` reads it),
``optimizer.safetensors`` (unless --no-save-optim), ``rng.json`` (unless --no-save-rng) and ``trainer_state.json``
(iteration, consumed samples, the arguments). The iteration is first written to a hidden temporary directory, which
is renamed into place when complete; ``latest_checkpointed_iteration.txt`` is replaced last (temp file + rename). A
save that dies half-way leaves the previous checkpoint as the latest, intact and loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

LATEST_FILE = "latest_checkpointed_iteration.txt"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.json"
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the cause."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_dir_name(pp_rank: int, pp_size: int, tp_rank: int = 0) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp_size > 1 else "")


@dataclass
class TrainerState:
    iteration: int
    consumed_samples: int
    args: dict[str, Any]


def read_latest(save_dir: Path) -> str | None:
    """The content of latest_checkpointed_iteration.txt: 'release', a number as text, or None if absent."""
    path = save_dir / LATEST_FILE
    if not path.is_file():
        return None
    value = path.read_text().strip()
    if value != "release" and not value.isdigit():
        raise CheckpointError(f"{path}: expected 'release' or an iteration number, found {value!r}")
    return value


def checkpoint_dir(save_dir: Path, latest: str) -> Path:
    return save_dir / ("release" if latest == "release" else iteration_dir_name(int(latest)))


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    save_dir: Path,
    iteration: int,
    *,
    rank_dir: str,
    write_weights: Callable[[Path], None],
    optimizer_state: dict[str, np.ndarray] | None,
    rng_state: dict[str, Any] | None,
    state: TrainerState,
    update_latest: bool = True,
) -> Path:
    """Write one rank's part of iteration ``iteration``; returns the final iteration directory."""
    final = save_dir / iteration_dir_name(iteration)
    tmp = save_dir / f".{iteration_dir_name(iteration)}.tmp-{os.getpid()}"
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        rank_path = tmp / rank_dir
        rank_path.mkdir(parents=True)
        write_weights(tmp)
        write_rank_files(rank_path, optimizer_state=optimizer_state, rng_state=rng_state, state=state)
        publish_iteration(save_dir, tmp, iteration, update_latest=update_latest)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not save iteration {iteration} to {final} ({err.strerror or err}); the previous checkpoint in "
            f"{save_dir} is untouched"
        ) from err
    return final


def write_rank_files(
    rank_path: Path,
    *,
    optimizer_state: dict[str, np.ndarray] | None,
    rng_state: dict[str, Any] | None,
    state: TrainerState,
) -> None:
    """The training-state files of one rank directory (the weights are written by ``omni_fast.convert``)."""
    if optimizer_state is not None:
        save_numpy({k: np.ascontiguousarray(v) for k, v in optimizer_state.items()}, str(rank_path / OPTIMIZER_FILE))
    if rng_state is not None:
        (rank_path / RNG_FILE).write_text(json.dumps(rng_state))
    (rank_path / STATE_FILE).write_text(json.dumps(state.__dict__, indent=2, default=str))


def publish_iteration(save_dir: Path, tmp: Path, iteration: int, *, update_latest: bool) -> Path:
    """Rename the complete directory ``tmp`` to ``save_dir/iter_NNNNNNN``, then update the latest file."""
    final = save_dir / iteration_dir_name(iteration)
    if final.exists():
        # Saving an iteration again (e.g. after a resume): replace it only once the new copy is complete.
        old = save_dir / f".{iteration_dir_name(iteration)}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if update_latest:
        _write_atomic_text(save_dir / LATEST_FILE, f"{iteration}\n")
    return final


def load_rank_files(iteration_path: Path, rank_dir: str) -> Path:
    path = iteration_path / rank_dir
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing (expected the rank directory {rank_dir} of this layout)")
    return path


def load_optimizer_state(rank_path: Path) -> dict[str, np.ndarray]:
    file = rank_path / OPTIMIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the checkpoint was saved with --no-save-optim; pass --no-load-optim)")
    return load_numpy(str(file))


def load_rng_state(rank_path: Path) -> dict[str, Any]:
    file = rank_path / RNG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the checkpoint was saved with --no-save-rng; pass --no-load-rng)")
    return json.loads(file.read_text())


def load_trainer_state(rank_path: Path) -> TrainerState:
    file = rank_path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    return TrainerState(**json.loads(file.read_text()))
