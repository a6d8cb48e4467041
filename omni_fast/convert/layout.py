"""Pipeline/tensor-parallel layouts and the MindSpeed-MM checkpoint directory conventions.

A MindSpeed-MM (Megatron) checkpoint directory::

    DIR/latest_checkpointed_iteration.txt        "release" or the iteration number
    DIR/release/ or DIR/iter_0000100/            the iteration directory
        mp_rank_TT/model.safetensors             pipeline size 1
        mp_rank_TT_PPP/model.safetensors         pipeline size > 1 (TT = tensor rank, PPP = pipeline rank)

MindSpeed-MM stores ``{'model': state_dict, 'checkpoint_version': 3.0}`` as ``model_optim_rng.pt`` (a torch
pickle). omni_fast stores the same state dict, same names and shapes, as ``model.safetensors``: the trainer never
imports torch and the converter can memory-map it. The trainer may put other files (optimizer, RNG) beside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LATEST_FILE = "latest_checkpointed_iteration.txt"
WEIGHTS_FILE = "model.safetensors"
RELEASE = "release"
MODALITIES = ("vit", "llm", "audio")  # MindSpeed-MM's order (merge_vpp_index): vision, text, audio
RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")


def iteration_dir_name(iteration: int | str) -> str:
    """``release`` or ``iter_0000100``."""
    if iteration == RELEASE:
        return RELEASE
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be 'release' or a non-negative int, got {iteration!r}")
    return f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """``mp_rank_TT`` for one pipeline stage, else ``mp_rank_TT_PPP`` (Megatron's naming, no expert suffix)."""
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp_size > 1 else "")


def read_latest_iteration(mm_dir: Path) -> Path:
    """The iteration directory named by ``mm_dir/latest_checkpointed_iteration.txt``."""
    mm_dir = Path(mm_dir)
    if not mm_dir.is_dir():
        raise FileNotFoundError(f"cfg.mm_dir: {mm_dir} is not a directory")
    latest = mm_dir / LATEST_FILE
    if not latest.is_file():
        raise FileNotFoundError(f"cfg.mm_dir: {mm_dir} has no {LATEST_FILE}")
    text = latest.read_text().strip()
    if text == RELEASE:
        name = RELEASE
    elif text.isdigit():
        name = iteration_dir_name(int(text))
    else:
        raise ValueError(f"cfg.mm_dir: {latest} must hold 'release' or an iteration number, not {text!r}")
    path = mm_dir / name
    if not path.is_dir():
        raise FileNotFoundError(f"cfg.mm_dir: {LATEST_FILE} names {name}, but {path} does not exist")
    return path


def find_rank_dirs(iteration_dir: Path) -> tuple[int, int]:
    """(tp_size, pp_size) of an iteration directory, checking that every mp_rank directory is there."""
    found = set()
    for child in iteration_dir.iterdir():
        match = RANK_DIR.fullmatch(child.name)
        if match and child.is_dir():
            found.add((int(match.group(1)), None if match.group(2) is None else int(match.group(2))))
        elif child.name.startswith("mp_rank_"):
            raise ValueError(f"{child}: not a rank directory omni_fast reads (expert-parallel suffixes are not "
                             "supported)")
    if not found:
        raise FileNotFoundError(f"{iteration_dir}: no mp_rank_* directories")
    staged = {pp is not None for _, pp in found}
    if len(staged) > 1:
        raise ValueError(f"{iteration_dir}: mixes mp_rank_TT and mp_rank_TT_PPP directories")
    tp_size = max(tp for tp, _ in found) + 1
    pp_size = max(pp for _, pp in found) + 1 if staged == {True} else 1
    if pp_size == 1 and staged == {True}:
        raise ValueError(f"{iteration_dir}: a single pipeline stage must be named mp_rank_TT, not mp_rank_TT_000")
    missing = [rank_dir_name(t, p, pp_size) for t in range(tp_size) for p in range(pp_size)
               if (t, p if pp_size > 1 else None) not in found]
    if missing:
        raise FileNotFoundError(f"{iteration_dir}: missing rank directories {', '.join(missing)}")
    return tp_size, pp_size


def parse_layer_list(value: Any, field: str) -> tuple[int, ...]:
    """A pipeline layer list from the CLI or Python: ``[11, 17]`` or ``[[11, 17]]`` (JSON text or a list).

    hf_to_mm's nested form is MindSpeed-MM's VppParallelConfig (outer = virtual-pipeline chunks); mm_to_hf takes the
    flat form. Both verbs accept both; more than one inner list (virtual pipeline) is rejected.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{field}: {value!r} is not a list like [11,17] or [[11,17]]") from None
    if isinstance(value, Sequence) and value and all(isinstance(v, Sequence) and not isinstance(v, str)
                                                     for v in value):
        if len(value) != 1:
            raise ValueError(f"{field}: {len(value)} virtual-pipeline chunks given; omni_fast converts one chunk per "
                             "stage (write [[a,b,...]] or [a,b,...])")
        value = value[0]
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"{field}: expected a non-empty list of layer counts, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
        raise ValueError(f"{field}: layer counts must be non-negative integers, got {list(value)}")
    return tuple(value)


@dataclass(frozen=True)
class ParallelLayout:
    """Layers per pipeline stage for each tower, and the tensor-parallel size (MindSpeed-MM's parallel_config).

    The lists must have one entry per stage and sum to the tower's depth; a tower's first-stage tensors (embedding,
    patch embed, audio convs) live on its first stage with layers, its last-stage tensors (final norm and output
    layer, projector, ln_post/proj) on its last stage with layers, and layer numbers restart at 0 on each stage.
    """

    llm_pp_layers: tuple[int, ...]
    vit_pp_layers: tuple[int, ...]
    audio_pp_layers: tuple[int, ...]
    tp_size: int = 1

    @classmethod
    def parse(cls, llm_pp_layers: Any, vit_pp_layers: Any, audio_pp_layers: Any, tp_size: Any = 1) -> ParallelLayout:
        """From CLI text or Python lists, nested or flat; errors name the parallel_config field."""
        if isinstance(tp_size, str):
            tp_size = int(tp_size) if tp_size.strip().isdigit() else tp_size
        return cls(parse_layer_list(llm_pp_layers, "parallel_config.llm_pp_layers"),
                   parse_layer_list(vit_pp_layers, "parallel_config.vit_pp_layers"),
                   parse_layer_list(audio_pp_layers, "parallel_config.audio_pp_layers"), tp_size)

    def __post_init__(self) -> None:
        for name in MODALITIES:
            field = f"{name}_pp_layers"
            value = tuple(getattr(self, field))
            if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
                raise ValueError(f"parallel_config.{field}: expected non-negative layer counts, got {list(value)}")
            object.__setattr__(self, field, value)
        if isinstance(self.tp_size, bool) or not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"parallel_config.tp_size must be a positive integer, got {self.tp_size!r}")
        for name in ("vit", "audio"):
            if len(self.layers(name)) != self.pp_size:
                # MindSpeed-MM only warns here ("hetero PP"); its writer then sizes the pipeline by the ViT list and
                # its reader by whichever list it is given. One entry per stage keeps every stage defined.
                raise ValueError(f"parallel_config.{name}_pp_layers has {len(self.layers(name))} entries but "
                                 f"parallel_config.llm_pp_layers has {self.pp_size}: give one count per stage")

    @property
    def pp_size(self) -> int:
        return len(self.llm_pp_layers)

    def layers(self, modality: str) -> tuple[int, ...]:
        return {"vit": self.vit_pp_layers, "llm": self.llm_pp_layers, "audio": self.audio_pp_layers}[modality]

    def stage_start(self, modality: str, stage: int) -> int:
        """Global index of the first layer of ``modality`` on ``stage``."""
        return sum(self.layers(modality)[:stage])

    def stage_of_layer(self, modality: str, layer: int) -> int:
        at = 0
        for stage, n in enumerate(self.layers(modality)):
            if at <= layer < at + n:
                return stage
            at += n
        raise ValueError(f"layer {layer} of {modality} is beyond parallel_config.{modality}_pp_layers")

    def first_stage(self, modality: str) -> int:
        """First stage holding layers of ``modality`` (MindSpeed-MM's first_layer_rank)."""
        return next(s for s, n in enumerate(self.layers(modality)) if n > 0)

    def last_stage(self, modality: str) -> int:
        """Last stage holding layers of ``modality`` (MindSpeed-MM's last_layer_rank)."""
        return max(s for s, n in enumerate(self.layers(modality)) if n > 0)

    def as_dict(self) -> dict[str, Any]:
        return {"llm_pp_layers": list(self.llm_pp_layers), "vit_pp_layers": list(self.vit_pp_layers),
                "audio_pp_layers": list(self.audio_pp_layers), "tp_size": self.tp_size}
