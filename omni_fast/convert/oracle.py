"""The numpy oracle of the conversion: MindSpeed-MM's procedure, step by step, on whole arrays.

It shares nothing with the compiled path's rule table (:func:`omni_fast.convert.qwen2_5_omni.thinker_rules`); it
follows MindSpeed-MM's own steps on a ``{name: array}`` dict: the regex operators (gate/up merge, q/k/v interleave,
q/v with a zero K, renames), ``split_by_tp``, ``partition_state_dict_by_pp``; and back, ``load_from_mm`` with
``rename_pp_parameter``, ``merge_by_tp``, the operators reverted, the merge with the original checkpoint and the
split by its file assignment. Files are written by the ``safetensors`` library (``safetensors.numpy``).

Arrays hold raw bits (unsigned integers of the element size), so bf16 needs no numpy float type and every move
is exact. Validation happens before (in :mod:`omni_fast.convert.qwen2_5_omni`); this module assumes valid input.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import deserialize
from safetensors.numpy import save_file

from omni_fast.config.model_config import ThinkerConfig
from omni_fast.convert.layout import MODALITIES, WEIGHTS_FILE, ParallelLayout, rank_dir_name
from omni_fast.convert.safetensors_io import ITEMSIZE, METADATA, numpy_dtype

if TYPE_CHECKING:
    from omni_fast.convert.qwen2_5_omni import HFCheckpoint, MMCheckpoint

State = dict[str, tuple[str, np.ndarray]]  # name -> (safetensors dtype, raw bits)

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def load(path: Path) -> State:
    return {name: (spec["dtype"], np.frombuffer(spec["data"], _BITS[ITEMSIZE[spec["dtype"]]]).reshape(spec["shape"]))
            for name, spec in deserialize(Path(path).read_bytes())}


def save(state: State, path: Path) -> None:
    save_file({name: np.ascontiguousarray(a).view(numpy_dtype(dtype)) for name, (dtype, a) in state.items()},
              str(path), metadata=METADATA)


# ------------------------------------------------------------------ MindSpeed-MM's operators

N = r"(\d+)"
T = "thinker."
RENAMES = [  # RenameOp's (HF prefix, MM prefix) pairs for Qwen2.5-Omni; {} is the layer number
    ("thinker.visual.blocks.{}.attn.proj.", "image_encoder.encoder.blocks.layers.{}.self_attention.linear_proj."),
    ("thinker.visual.blocks.{}.mlp.down_proj.", "image_encoder.encoder.blocks.layers.{}.mlp.linear_fc2."),
    ("thinker.visual.blocks.{}.norm1.", "image_encoder.encoder.blocks.layers.{}.input_layernorm."),
    ("thinker.visual.blocks.{}.norm2.", "image_encoder.encoder.blocks.layers.{}.pre_mlp_layernorm."),
    ("thinker.visual.merger.ln_q.", "image_encoder.projector.layernorm."),
    ("thinker.visual.merger.mlp.0.", "image_encoder.projector.encoder.linear_fc1."),
    ("thinker.visual.merger.mlp.2.", "image_encoder.projector.encoder.linear_fc2."),
    ("thinker.visual.patch_embed.proj.", "image_encoder.encoder.patch_embed.proj."),
    ("thinker.model.embed_tokens.", "text_decoder.embedding.word_embeddings."),
    ("thinker.model.layers.{}.input_layernorm.", "text_decoder.decoder.layers.{}.input_layernorm."),
    ("thinker.model.layers.{}.mlp.down_proj.", "text_decoder.decoder.layers.{}.mlp.linear_fc2."),
    ("thinker.model.layers.{}.post_attention_layernorm.", "text_decoder.decoder.layers.{}.pre_mlp_layernorm."),
    ("thinker.model.layers.{}.self_attn.o_proj.", "text_decoder.decoder.layers.{}.self_attention.linear_proj."),
    ("thinker.lm_head.", "text_decoder.output_layer."),
    ("thinker.model.norm.", "text_decoder.decoder.final_layernorm."),
    ("thinker.audio_tower.layers.{}.fc1.", "audio_encoder.encoder.blocks.layers.{}.mlp.linear_fc1."),
    ("thinker.audio_tower.layers.{}.fc2.", "audio_encoder.encoder.blocks.layers.{}.mlp.linear_fc2."),
    ("thinker.audio_tower.layers.{}.final_layer_norm.", "audio_encoder.encoder.blocks.layers.{}.pre_mlp_layernorm."),
    ("thinker.audio_tower.layers.{}.self_attn.out_proj.",
     "audio_encoder.encoder.blocks.layers.{}.self_attention.linear_proj."),
    ("thinker.audio_tower.layers.{}.self_attn_layer_norm.", "audio_encoder.encoder.blocks.layers.{}.input_layernorm."),
    *((f"thinker.audio_tower.{n}.", f"audio_encoder.encoder.{n}.")
      for n in ("ln_post", "proj", "audio_bos_eos_token", "conv1", "conv2")),
]


def _pattern(template: str) -> str:
    """A name template (``{}`` = layer number) as an anchored regex capturing the number."""
    return "^" + re.escape(template).replace(r"\{\}", N)


def rename(state: State, reverse: bool) -> None:
    """RenameOp.apply (or .revert with ``reverse``): every pair tried on every name, in order."""
    pairs = [(re.compile(_pattern(dst if reverse else src)), (src if reverse else dst).replace("{}", r"\1"))
             for src, dst in RENAMES]
    for name in list(state):
        new = name
        for pattern, replacement in pairs:
            new = pattern.sub(replacement, new, count=1)
        if new != name:
            state[new] = state.pop(name)


def interleave(q: np.ndarray, k: np.ndarray, v: np.ndarray, groups: int) -> np.ndarray:
    """merge_to_interleaved_qkv: [q_0, k_0, v_0, q_1, k_1, v_1, ...] over ``groups`` equal chunks of each."""
    chunks = [np.split(x, groups, axis=0) for x in (q, k, v)]
    return np.concatenate([h for group in zip(*chunks) for h in group], axis=0)


def deinterleave(qkv: np.ndarray, groups: int, sizes: tuple[int, int, int]) -> list[np.ndarray]:
    """split_to_interleaved_qkv: the inverse, with per-group row counts (q, k, v)."""
    per_group = [np.split(c, np.cumsum(sizes)[:2], axis=0) for c in np.split(qkv, groups, axis=0)]
    return [np.concatenate(parts, axis=0) for parts in zip(*per_group)]


def _layers(state: State, pattern: str) -> int:
    found = [int(m.group(1)) for name in state if (m := re.match(pattern, name))]
    return max(found) + 1 if found else 0


Merge = tuple[tuple[str, ...], str, Callable[..., np.ndarray], Callable[[np.ndarray], list[np.ndarray]]]


def merge_ops(cfg: ThinkerConfig) -> list[Merge]:
    """MindSpeed-MM's merge operators for Qwen2.5-Omni as (raw name templates, new template, merge, split)."""
    t, v, a = cfg.text, cfg.vision, cfg.audio
    llm_q = t.hidden_size // t.num_attention_heads * t.num_attention_heads // t.num_key_value_heads
    llm_kv = t.hidden_size // t.num_attention_heads
    vit_hd, audio_hd = v.hidden_size // v.num_heads, a.d_model // a.encoder_attention_heads

    def upgate(*xs: np.ndarray) -> np.ndarray:
        return np.concatenate(xs, axis=0)

    def halves(x: np.ndarray) -> list[np.ndarray]:
        return np.split(x, 2, axis=0)

    def qkv(groups: int, sizes: tuple[int, int, int]) -> tuple[Callable[..., np.ndarray], Callable]:
        return (lambda q, k, val: interleave(q, k, val, groups)), (lambda x: deinterleave(x, groups, sizes))

    def qv(groups: int, size: int) -> tuple[Callable[..., np.ndarray], Callable]:
        # QVToQKVMergeOp: a zero K bias shaped like q's; on revert the K rows are dropped.
        return ((lambda q, val: interleave(q, np.zeros_like(q), val, groups)),
                (lambda x: deinterleave(x, groups, (size, size, size))[::2]))

    vb, tb, ab = "thinker.visual.blocks.{}.", "thinker.model.layers.{}.", "thinker.audio_tower.layers.{}."
    vm, tm, am = ("image_encoder.encoder.blocks.layers.{}.", "text_decoder.decoder.layers.{}.",
                  "audio_encoder.encoder.blocks.layers.{}.")
    ops: list[Merge] = [
        ((vb + "mlp.gate_proj.weight", vb + "mlp.up_proj.weight"), vm + "mlp.linear_fc1.weight", upgate, halves),
        ((vb + "mlp.gate_proj.bias", vb + "mlp.up_proj.bias"), vm + "mlp.linear_fc1.bias", upgate, halves),
        ((tb + "mlp.gate_proj.weight", tb + "mlp.up_proj.weight"), tm + "mlp.linear_fc1.weight", upgate, halves),
    ]
    for kind in ("weight", "bias"):
        ops.append(((tb + f"self_attn.q_proj.{kind}", tb + f"self_attn.k_proj.{kind}", tb + f"self_attn.v_proj.{kind}"),
                    tm + f"self_attention.linear_qkv.{kind}", *qkv(t.num_key_value_heads, (llm_q, llm_kv, llm_kv))))
    for kind in ("weight", "bias"):
        ops.append(((vb + f"attn.q.{kind}", vb + f"attn.k.{kind}", vb + f"attn.v.{kind}"),
                    vm + f"self_attention.linear_qkv.{kind}", *qkv(v.num_heads, (vit_hd,) * 3)))
    ops.append(((ab + "self_attn.q_proj.weight", ab + "self_attn.k_proj.weight", ab + "self_attn.v_proj.weight"),
                am + "self_attention.linear_qkv.weight", *qkv(a.encoder_attention_heads, (audio_hd,) * 3)))
    ops.append(((ab + "self_attn.q_proj.bias", ab + "self_attn.v_proj.bias"), am + "self_attention.linear_qkv.bias",
                *qv(a.encoder_attention_heads, audio_hd)))
    return ops


def apply_merge(state: State, op: Merge) -> None:
    raws, new, merge, _ = op
    for i in range(_layers(state, _pattern(raws[0]))):
        dtype = state[raws[0].format(i)][0]
        state[new.format(i)] = (dtype, merge(*(state.pop(r.format(i))[1] for r in raws)))


def revert_merge(state: State, op: Merge) -> None:
    raws, new, _, split = op
    for i in range(_layers(state, _pattern(new))):
        dtype, merged = state.pop(new.format(i))
        for raw, part in zip(raws, split(merged)):
            state[raw.format(i)] = (dtype, part)


# ------------------------------------------------------------------ tensor and pipeline parallel

_L = r"\.(\d+)\."
TP_PATTERNS = [  # MindSpeed-MM's qwen2_5_omni_tp_patterns; first match wins, unmatched -> replicated
    (r"^text_decoder\.output_layer\.weight$", "row"),
    (r"^text_decoder\.embedding\.word_embeddings\.weight$", "row"),
    (rf"^text_decoder\.decoder\.layers{_L}mlp\.linear_fc1\.weight$", "glu"),
    (rf"^text_decoder\.decoder\.layers{_L}mlp\.linear_fc2\.weight$", "col"),
    (rf"^text_decoder\.decoder\.layers{_L}self_attention\.linear_qkv\.(weight|bias)$", "row"),
    (rf"^text_decoder\.decoder\.layers{_L}self_attention\.linear_proj\.weight$", "col"),
    (rf"^image_encoder\.encoder\.blocks\.layers{_L}self_attention\.linear_proj\.weight$", "col"),
    (rf"^image_encoder\.encoder\.blocks\.layers{_L}self_attention\.linear_qkv\.(weight|bias)$", "row"),
    (rf"^image_encoder\.encoder\.blocks\.layers{_L}mlp\.linear_fc1\.(weight|bias)$", "glu"),
    (rf"^image_encoder\.encoder\.blocks\.layers{_L}mlp\.linear_fc2\.weight$", "col"),
    (r"^image_encoder\.projector\.encoder\.linear_fc1\.(weight|bias)$", "row"),
    (r"^image_encoder\.projector\.encoder\.linear_fc2\.weight$", "col"),
    (rf"^audio_encoder\.encoder\.blocks\.layers{_L}self_attention\.linear_qkv\.(weight|bias)$", "row"),
    (rf"^audio_encoder\.encoder\.blocks\.layers{_L}self_attention\.linear_proj\.weight$", "col"),
    (rf"^audio_encoder\.encoder\.blocks\.layers{_L}mlp\.linear_fc1\.(weight|bias)$", "row"),
    (rf"^audio_encoder\.encoder\.blocks\.layers{_L}mlp\.linear_fc2\.weight$", "col"),
]


def _tp_kind(name: str) -> str:
    return next((kind for pattern, kind in TP_PATTERNS if re.match(pattern, name)), "replicate")


def tp_split(x: np.ndarray, kind: str, tp: int) -> list[np.ndarray]:
    if kind == "row":
        return np.split(x, tp, axis=0)
    if kind == "col":
        return np.split(x, tp, axis=1)
    if kind == "glu":
        gate, up = np.split(x, 2, axis=0)
        return [np.concatenate([g, u], axis=0) for g, u in zip(np.split(gate, tp), np.split(up, tp))]
    return [x] * tp


def tp_merge(xs: list[np.ndarray], kind: str) -> np.ndarray:
    if kind == "row":
        return np.concatenate(xs, axis=0)
    if kind == "col":
        return np.concatenate(xs, axis=1)
    if kind == "glu":
        halves = [np.split(x, 2, axis=0) for x in xs]
        return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
    return xs[0]


SCHEMAS = {  # partition_state_dict_by_pp's PPStageSchema: first-stage prefixes, last-stage prefixes, layer prefix
    "vit": (("image_encoder.encoder.patch_embed.",), ("image_encoder.projector.",),
            "image_encoder.encoder.blocks.layers."),
    "llm": (("text_decoder.embedding.",), ("text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."),
            "text_decoder.decoder.layers."),
    "audio": (("audio_encoder.encoder.conv", "audio_encoder.encoder.audio_bos_eos_token"),
              ("audio_encoder.encoder.proj", "audio_encoder.encoder.ln_post"), "audio_encoder.encoder.blocks.layers."),
}


def pp_partition(state: State, layout: ParallelLayout) -> list[State]:
    stages: list[State] = [{} for _ in range(layout.pp_size)]
    for m in MODALITIES:
        firsts, lasts, middle = SCHEMAS[m]
        counts = layout.layers(m)
        nonzero = [s for s, n in enumerate(counts) if n]
        starts = np.cumsum((0,) + counts)
        for name, value in state.items():
            if name.startswith(firsts):
                stages[nonzero[0]][name] = value
            if name.startswith(lasts):
                stages[nonzero[-1]][name] = value
            if name.startswith(middle):
                layer, rest = name[len(middle):].split(".", 1)
                stage = int(np.searchsorted(starts, int(layer), side="right")) - 1
                stages[stage][f"{middle}{int(layer) - starts[stage]}.{rest}"] = value
    return stages


def pp_unpartition_name(name: str, layout: ParallelLayout, stage: int) -> str:
    """rename_pp_parameter: add the stage's layer offset to a layer name of each tower."""
    for m in MODALITIES:
        middle = SCHEMAS[m][2]
        if name.startswith(middle):
            layer, rest = name[len(middle):].split(".", 1)
            return f"{middle}{int(layer) + sum(layout.layers(m)[:stage])}.{rest}"
    return name


# ------------------------------------------------------------------ the two directions


def hf_to_mm(hf: HFCheckpoint, layout: ParallelLayout, iteration_dir: Path) -> list[Path]:
    """MindSpeed-MM's convert_hf_to_mm (load everything, operators, TP split, PP partition, save)."""
    state: State = {}
    for file in sorted(set(hf.file_of.values())):
        for name, value in load(file).items():
            state[name if hf.prefix else T + name] = value  # MindSpeed-MM's patterns expect "thinker."
    for op in merge_ops(hf.config):
        apply_merge(state, op)
    rename(state, reverse=False)
    tp_states: list[State] = [{} for _ in range(layout.tp_size)]
    for name, (dtype, value) in state.items():
        for tp, shard in enumerate(tp_split(value, _tp_kind(name), layout.tp_size)):
            tp_states[tp][name] = (dtype, shard)
    files = []
    for tp, tp_state in enumerate(tp_states):
        for pp, stage_state in enumerate(pp_partition(tp_state, layout)):
            out = iteration_dir / rank_dir_name(tp, pp, layout.pp_size) / WEIGHTS_FILE
            out.parent.mkdir(parents=True, exist_ok=True)
            save(stage_state, out)
            files.append(out)
    return files


def mm_to_hf(mm: MMCheckpoint, hf: HFCheckpoint, out_dir: Path) -> list[Path]:
    """MindSpeed-MM's convert_mm_to_hf with merge_source=True, output split like the original files."""
    layout = mm.layout
    tp_states: list[State] = []
    for tp in range(layout.tp_size):
        merged: State = {}
        for pp in range(layout.pp_size):
            for name, value in load(mm.files[tp, pp]).items():
                merged[pp_unpartition_name(name, layout, pp)] = value
        tp_states.append(merged)
    state: State = {name: (dtype, tp_merge([s[name][1] for s in tp_states], _tp_kind(name)))
                    for name, (dtype, _) in tp_states[0].items()}
    rename(state, reverse=True)
    for op in merge_ops(hf.config):
        revert_merge(state, op)
    converted = {(name if hf.prefix else name[len(T):]): value for name, value in state.items()}
    files = []
    for file in sorted(set(hf.file_of.values())):
        original = load(file)
        save({name: converted.get(name, value) for name, value in original.items()}, out_dir / file.name)
        files.append(out_dir / file.name)
    return files
