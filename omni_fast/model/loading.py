"""Read a local Hugging Face Qwen2.5-Omni directory into a Thinker.

Accepts the hub layout (``Qwen2_5OmniConfig`` with ``thinker_config``, tensors prefixed ``thinker.`` beside
``talker.*`` and ``token2wav.*``) and the thinker-only layout (``save_pretrained`` of the thinker class, no prefix),
single-file or sharded with ``model.safetensors.index.json``. Tensors are read by MindSpore's own safetensors
loader (lazy, memory-mapped; bf16 stays bf16 bit for bit).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import mindspore as ms
from mindspore import nn

THINKER_PREFIX = "thinker."
OTHER_PARTS = ("talker.", "token2wav.")
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a model directory, from its index if there is one."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: not a safetensors index ({err})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (and no {INDEX_FILE})")
    return files


def thinker_key(name: str) -> str | None:
    """Checkpoint key -> thinker parameter name, or None for talker/token2wav tensors."""
    if name.startswith(OTHER_PARTS):
        return None
    return name[len(THINKER_PREFIX) :] if name.startswith(THINKER_PREFIX) else name


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state_into(model: nn.Cell, model_dir: Path) -> None:
    """Copy every thinker tensor of ``model_dir`` into ``model``; raise listing any mismatch."""
    loaded: dict[str, ms.Parameter] = {}
    for file in safetensors_files(model_dir):
        tensors = ms.load_checkpoint(
            str(file), format="safetensors", choice_func=lambda name: thinker_key(name) is not None
        )
        for name, tensor in tensors.items():
            loaded[thinker_key(name)] = tensor
    assign_state(model, loaded, model_dir)


def load_mm_state_into(model: nn.Cell, mm_dir: Path) -> None:
    """Same from a MindSpeed-MM checkpoint directory (its latest iteration, any PP/TP layout); ``model`` is a
    ``Qwen2_5OmniThinker``, whose config the MM layout needs."""
    from omni_fast.convert import read_mm_thinker  # here: omni_fast.convert imports this module

    tensors = read_mm_thinker(mm_dir, model.config)
    assign_state(model, {name: ms.Tensor(value) for name, value in tensors.items()}, mm_dir)


def assign_state(model: nn.Cell, loaded: dict[str, ms.Tensor], source: Path) -> None:
    """Set every parameter of ``model`` from ``loaded`` (cast to the parameter dtype); raise listing any mismatch."""
    params = dict(model.parameters_and_names())
    missing = params.keys() - loaded.keys()
    unexpected = loaded.keys() - params.keys()
    misshaped = [
        f"{name} {tuple(loaded[name].shape)} vs model {tuple(params[name].shape)}"
        for name in params.keys() & loaded.keys()
        if tuple(loaded[name].shape) != tuple(params[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"not in the model ({len(unexpected)}): {_listing(unexpected)}")
    if misshaped:
        problems.append(f"wrong shape ({len(misshaped)}): {_listing(misshaped)}")
    if problems:
        raise ValueError(f"{source}: checkpoint does not match the Thinker config:\n  " + "\n  ".join(problems))
    for name, param in params.items():
        tensor = loaded[name]
        param.set_data(tensor if tensor.dtype == param.dtype else tensor.astype(param.dtype))
