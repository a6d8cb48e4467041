"""Pipeline stages from model.json's ``pipeline_num_layers``: validation, and which stage owns which parameters.

MindSpeed-MM's semantics (guide "单机运行配置"; docs/reference/mindspeed_mm.md sections 1.2 and 2.4):

* each module with layers (``image_encoder.vision_encoder``, ``audio_encoder.audio_encoder``, ``text_decoder``) lists
  how many of its layers each pipeline stage holds; one entry per stage, summing to the module's layer count (read
  only when there is more than one stage);
* encoders first: every encoder layer sits on a stage before, or on, the first stage holding text layers
  (``[32,0,0,0]`` + ``[1,10,10,7]`` is valid, ``[30,2,0,0]`` + ``[1,10,10,7]`` is not);
* a module's front end lives on its first stage with layers (text embedding, vision patch embed, audio convs and
  ``audio_bos_eos_token``), its back end on its last stage with layers (text final norm and ``lm_head``, the vision
  projector ``merger``, audio ``ln_post``/``proj``); layer numbers restart at 0 on each stage in MM checkpoints.

omni_fast adds two checks the reference leaves to a hang or a crash at run time: the last stage must hold text
layers (it computes the loss), and every stage must hold at least one layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omni_fast.config.mm_model import ModelSpec

ENCODERS = ("vision_encoder", "audio_encoder")
PIPELINE_MODULES = (*ENCODERS, "text_decoder")
JSON_PATH = {
    "vision_encoder": "image_encoder.vision_encoder",
    "audio_encoder": "audio_encoder.audio_encoder",
    "text_decoder": "text_decoder",
}
DUMMY_FLAG = "--enable-dummy-optimizer"


def module_depths(spec: ModelSpec) -> dict[str, int]:
    t = spec.thinker
    return {
        "vision_encoder": t.vision.depth,
        "audio_encoder": t.audio.encoder_layers,
        "text_decoder": t.text.num_hidden_layers,
    }


@dataclass(frozen=True)
class PipelineLayout:
    """Layers per stage for each module with layers; ``size`` stages."""

    vision_encoder: tuple[int, ...]
    audio_encoder: tuple[int, ...]
    text_decoder: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.text_decoder)

    def counts(self, module: str) -> tuple[int, ...]:
        return getattr(self, module)

    def layer_range(self, module: str, stage: int) -> range:
        """Global indices of ``module``'s layers on ``stage``."""
        counts = self.counts(module)
        start = sum(counts[:stage])
        return range(start, start + counts[stage])

    def first_stage(self, module: str) -> int:
        """The first stage holding layers of ``module`` (its front end lives there); 0 for a module without layers."""
        return next((s for s, n in enumerate(self.counts(module)) if n), 0)

    def last_stage(self, module: str) -> int:
        """The last stage holding layers of ``module`` (its back end lives there); 0 for a module without layers."""
        return max((s for s, n in enumerate(self.counts(module)) if n), default=0)

    def describe(self) -> str:
        return ", ".join(f"{JSON_PATH[m]}.pipeline_num_layers {list(self.counts(m))}" for m in PIPELINE_MODULES)


def _as_counts(value: Any, field: str) -> tuple[int, ...]:
    """A flat list of non-negative ints; MindSpeed-MM's nested form ``[[a, b]]`` with one chunk is accepted."""
    if isinstance(value, Sequence) and not isinstance(value, str) and value and all(
        isinstance(v, Sequence) and not isinstance(v, str) for v in value
    ):
        if len(value) != 1:
            raise ValueError(f"{field} {value}: {len(value)} virtual-pipeline chunks; only one chunk per stage is "
                             "supported (write [a, b, ...])")
        value = value[0]
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)
    ):
        raise ValueError(f"{field} must be a non-empty list of non-negative layer counts, got {value!r}")
    return tuple(value)


def validate_pipeline_layout(spec: ModelSpec, size: int) -> PipelineLayout:
    """Check ``pipeline_num_layers`` against ``--pipeline-model-parallel-size`` before any work.

    With one stage the lists are not read (as in MindSpeed-MM, which consults them only when the pipeline size is
    above 1: ``model_7b.json``'s two-stage lists also serve a single-stage run). Raises ``ValueError`` naming the
    module's list.
    """
    depths = module_depths(spec)
    if size == 1:
        return PipelineLayout(**{m: (depths[m],) for m in PIPELINE_MODULES})
    counts: dict[str, tuple[int, ...]] = {}
    problems = []
    for module in PIPELINE_MODULES:
        field = f"model.json {JSON_PATH[module]}.pipeline_num_layers"
        raw = spec.pipeline_num_layers.get(module)
        if raw is None:
            problems.append(f"{field} is missing: with --pipeline-model-parallel-size {size} every module needs a "
                            f"list of {size} layer counts")
            continue
        try:
            value = _as_counts(raw, field)
        except ValueError as err:
            problems.append(str(err))
            continue
        if len(value) != size:
            problems.append(f"{field} {list(value)} has {len(value)} entries, but --pipeline-model-parallel-size is "
                            f"{size}: give one layer count per stage")
        elif sum(value) != depths[module]:
            problems.append(f"{field} {list(value)} sums to {sum(value)}, but {JSON_PATH[module]} has "
                            f"{depths[module]} layers (num_layers)")
        counts[module] = value
    if problems:
        raise ValueError("invalid pipeline layout:\n  " + "\n  ".join(problems))
    layout = PipelineLayout(**counts)

    text_field = f"text_decoder.pipeline_num_layers {list(layout.text_decoder)}"
    text_first = layout.first_stage("text_decoder")
    for module in ENCODERS:
        last = layout.last_stage(module)
        if depths[module] and last > text_first:
            problems.append(
                f"{JSON_PATH[module]}.pipeline_num_layers {list(layout.counts(module))} puts {module} layers on stage "
                f"{last}, after {text_field} starts the text layers on stage {text_first}: every encoder layer must "
                "come before the first text layer (e.g. [32, 0, 0, 0] with [1, 10, 10, 7])"
            )
    if layout.text_decoder[-1] == 0:
        problems.append(f"{text_field}: the last stage must hold text layers (it owns the final norm, the output "
                        "layer and the loss)")
    for stage in range(size):
        if not any(layout.counts(m)[stage] for m in PIPELINE_MODULES):
            problems.append(f"stage {stage} holds no layers ({layout.describe()})")
    if problems:
        raise ValueError("invalid pipeline layout:\n  " + "\n  ".join(problems))
    return layout


def stage_parts(layout: PipelineLayout, stage: int) -> list[tuple[str, str | None]]:
    """(parameter-name prefix, model.json module) for everything ``stage`` owns; module None = never trained.

    The names are the Thinker's (``Qwen2_5OmniThinker.parameters_and_names``); the modules are those of
    ``omni_fast.train.trainer.MODULE_PREFIXES`` whose ``freeze`` applies.
    """
    parts: list[tuple[str, str | None]] = []
    if stage == layout.first_stage("audio_encoder"):
        parts += [("audio_tower.conv1.", "audio_encoder"), ("audio_tower.conv2.", "audio_encoder"),
                  ("audio_tower.audio_bos_eos_token.", None)]  # unused by the forward, never trained
    parts += [(f"audio_tower.layers.{i}.", "audio_encoder") for i in layout.layer_range("audio_encoder", stage)]
    if stage == layout.last_stage("audio_encoder"):
        parts += [("audio_tower.ln_post.", "audio_encoder"), ("audio_tower.proj.", "audio_encoder")]
    if stage == layout.first_stage("vision_encoder"):
        parts.append(("visual.patch_embed.", "vision_encoder"))
    parts += [(f"visual.blocks.{i}.", "vision_encoder") for i in layout.layer_range("vision_encoder", stage)]
    if stage == layout.last_stage("vision_encoder"):
        parts.append(("visual.merger.", "vision_projector"))
    if stage == layout.first_stage("text_decoder"):
        parts.append(("model.embed_tokens.", "text_decoder"))
    parts += [(f"model.layers.{i}.", "text_decoder") for i in layout.layer_range("text_decoder", stage)]
    if stage == layout.size - 1:
        parts += [("model.norm.", "text_decoder"), ("lm_head.", "text_decoder")]
    return parts


def stage_trains(layout: PipelineLayout, freeze: dict[str, bool], stage: int) -> bool:
    """Whether ``stage`` owns any parameter that is trained (model.json ``freeze`` per module)."""
    return any(module is not None and not freeze[module] for _, module in stage_parts(layout, stage))


def check_dummy_optimizer(layout: PipelineLayout, freeze: dict[str, bool], enabled: bool) -> None:
    """A stage whose parameters are all frozen has nothing to optimize: it needs ``--enable-dummy-optimizer``."""
    frozen = [s for s in range(layout.size) if not stage_trains(layout, freeze, s)]
    if len(frozen) == layout.size:
        raise ValueError("every parameter is frozen (model.json freeze): there is nothing to train")
    if frozen and not enabled:
        raise ValueError(
            f"pipeline stage(s) {frozen} hold only frozen parameters ({layout.describe()}; frozen modules: "
            f"{', '.join(m for m, f in freeze.items() if f) or 'none'}): add {DUMMY_FLAG} to train with a stage "
            "that keeps no optimizer state"
        )
