"""Qwen2.5-Omni thinker weights: Hugging Face layout <-> MindSpeed-MM layout, split for pipeline and tensor parallel.

Rules (MindSpeed-MM ``checkpoint/vlm_model/converters/qwen2_5omni.py``, ``operator.py``, ``hf_to_mm.py``,
``mm_to_hf.py``; summarised in docs/reference/mindspeed_mm.md section 2):

* renames ``thinker.model.*`` -> ``text_decoder.*``, ``thinker.visual.*`` -> ``image_encoder.*``,
  ``thinker.audio_tower.*`` -> ``audio_encoder.encoder.*`` (table in :func:`thinker_rules`);
* q/k/v fused into ``linear_qkv`` interleaved per group: ``[q_g, k_g, v_g]`` for each key-value group of the LLM
  (GQA: q_g is num_heads/num_kv_heads heads) and for each head of the vision and audio towers;
* the audio tower has no K bias: a zero one is inserted before interleaving, and dropped on the way back (a bias
  on K adds the same q.b to every score of a query, which softmax ignores, so dropping it is exact);
* gate/up concatenated into ``linear_fc1`` as ``[gate; up]`` (LLM, vision; the audio MLP is not gated);
* tensor parallel: "row" (dim 0 in tp_size chunks: qkv, embedding, output layer, projector fc1, audio fc1),
  "col" (dim 1: linear_proj and linear_fc2 weights), "glu" (each of gate and up in tp_size chunks, rank r holds
  ``[gate_r; up_r]``), everything else replicated. On the way back a replicated tensor is read from tensor rank 0;
* pipeline: layer i of a tower goes to the stage whose range holds it, renumbered from 0 there; a tower's
  first-stage tensors go to its first stage with layers, its last-stage tensors to its last stage with layers;
* talker/token2wav tensors are not part of the MM checkpoint; mm_to_hf copies them from the original HF directory.

Two implementations: the compiled one here (rules lowered to byte rectangles, :mod:`omni_fast.convert.engine`,
run in C++ from memory-mapped files) and the numpy oracle in :mod:`omni_fast.convert.oracle` (MindSpeed-MM's
procedure on whole arrays, written with the safetensors library). They write byte-identical files.

Public functions:

* :func:`hf_to_mm` / :func:`mm_to_hf`: the two ``mm-convert`` verbs, directory to directory. Everything is
  validated before the first write; output goes to a hidden sibling directory renamed into place at the end.
* :func:`read_mm_thinker`: an MM checkpoint (``release`` or ``iter_NNNNNNN``, any PP/TP layout, read from the
  directory names and headers) -> ``{hf_name: numpy array}`` in memory, names as ``Qwen2_5OmniThinker``'s
  parameters (no ``thinker.`` prefix), dtypes kept (bf16 as MindSpore's numpy bfloat16, so ``ms.Tensor(array)``
  is bf16). ``stages=[p]`` reads only what pipeline stage p holds.
* :func:`write_mm_thinker`: ``{hf_name: numpy array}`` -> ``ITERATION_DIR/mp_rank_TT[_PPP]/model.safetensors`` for
  a layout, the files :func:`hf_to_mm` would write for the same tensors and :func:`mm_to_hf` reads. It writes only
  the weights and never touches ``latest_checkpointed_iteration.txt``: the trainer writes the iteration into a
  temporary directory, adds its optimizer/RNG files, renames it and updates the latest file itself.
  ``stages=[p]`` writes only stage p's files, from only the tensors it holds.

For the trainer::

    layout = ParallelLayout.parse(llm_pp_layers, vit_pp_layers, audio_pp_layers, tp_size)  # model.json's lists
    write_mm_thinker({n: p.asnumpy() for n, p in model.parameters_and_names()}, tmp_iteration_dir, model.config,
                     layout)
    omni_fast.model.loading.load_mm_state_into(model, save_dir)  # or read_mm_thinker(save_dir, model.config)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omni_fast.config.model_config import ThinkerConfig
from omni_fast.convert import oracle
from omni_fast.convert.engine import CopyPlan, Loc, Rect, row_cols
from omni_fast.convert.layout import (
    LATEST_FILE,
    MODALITIES,
    RELEASE,
    WEIGHTS_FILE,
    ParallelLayout,
    find_rank_dirs,
    iteration_dir_name,
    rank_dir_name,
    read_latest_iteration,
)
from omni_fast.convert.safetensors_io import (
    FLOAT_DTYPES,
    ITEMSIZE,
    TensorEntry,
    build_header,
    numpy_dtype,
    read_header,
)
from omni_fast.model.loading import INDEX_FILE, THINKER_PREFIX, safetensors_files, thinker_key

ROW, COL, GLU, REPLICATE = "row", "col", "glu", "replicate"
FIRST, LAST, LAYER = "first", "last", "layer"
LAYER_PREFIX = {
    "llm": "text_decoder.decoder.layers.",
    "vit": "image_encoder.encoder.blocks.layers.",
    "audio": "audio_encoder.encoder.blocks.layers.",
}
DEPTH_FIELD = {
    "llm": "thinker_config.text_config.num_hidden_layers",
    "vit": "thinker_config.vision_config.depth",
    "audio": "thinker_config.audio_config.encoder_layers",
}


# ------------------------------------------------------------------ the rules


@dataclass(frozen=True)
class Part:
    """Rows ``[row0, row0 + rows)`` of HF tensor ``hf`` (None: zero rows) inside a fused MM tensor."""

    hf: str | None
    row0: int
    rows: int


@dataclass(frozen=True)
class Rule:
    """One MM tensor: its name (``{}`` stands for the layer number), where it lives, and how it is built."""

    template: str
    modality: str  # "vit" | "llm" | "audio"
    stage: str  # FIRST | LAST | LAYER
    layer: int | None  # global layer index for LAYER rules
    parts: tuple[Part, ...]  # concatenated along dim 0
    split: str  # ROW | COL | GLU | REPLICATE

    @property
    def name(self) -> str:
        """The global MM name (layers numbered over the whole tower)."""
        return self.template.format(self.layer)

    @property
    def hf_names(self) -> tuple[str, ...]:
        """The HF tensors it is built from, each once, in order."""
        return tuple(dict.fromkeys(p.hf for p in self.parts if p.hf is not None))


def hf_thinker_shapes(cfg: ThinkerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers 4.53 thinker state dict (names without ``thinker.``) and its shape."""
    t, v, a = cfg.text, cfg.vision, cfg.audio
    hidden, q_rows, kv_rows = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (t.vocab_size, hidden)}
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            shapes[f"{p}self_attn.{proj}.weight"] = (rows, hidden)
            shapes[f"{p}self_attn.{proj}.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (hidden, q_rows)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (t.intermediate_size, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, t.intermediate_size)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (t.vocab_size, hidden)

    cv, iv, merged, out = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size**2, v.out_hidden_size
    shapes["visual.patch_embed.proj.weight"] = (cv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        shapes[f"{p}norm1.weight"] = shapes[f"{p}norm2.weight"] = (cv,)
        for proj in ("q", "k", "v", "proj"):
            shapes[f"{p}attn.{proj}.weight"], shapes[f"{p}attn.{proj}.bias"] = (cv, cv), (cv,)
        for proj in ("gate_proj", "up_proj"):
            shapes[f"{p}mlp.{proj}.weight"], shapes[f"{p}mlp.{proj}.bias"] = (iv, cv), (iv,)
        shapes[f"{p}mlp.down_proj.weight"], shapes[f"{p}mlp.down_proj.bias"] = (cv, iv), (cv,)
    shapes["visual.merger.ln_q.weight"] = (cv,)
    shapes["visual.merger.mlp.0.weight"], shapes["visual.merger.mlp.0.bias"] = (merged, merged), (merged,)
    shapes["visual.merger.mlp.2.weight"], shapes["visual.merger.mlp.2.bias"] = (out, merged), (out,)

    d, ffn = a.d_model, a.encoder_ffn_dim
    shapes["audio_tower.conv1.weight"], shapes["audio_tower.conv1.bias"] = (d, a.num_mel_bins, 3), (d,)
    shapes["audio_tower.conv2.weight"], shapes["audio_tower.conv2.bias"] = (d, d, 3), (d,)
    shapes["audio_tower.audio_bos_eos_token.weight"] = (2, a.output_dim)
    for i in range(a.encoder_layers):
        p = f"audio_tower.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (d, d)
            if proj != "k_proj":
                shapes[f"{p}self_attn.{proj}.bias"] = (d,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (d,)
        shapes[f"{p}fc1.weight"], shapes[f"{p}fc1.bias"] = (ffn, d), (ffn,)
        shapes[f"{p}fc2.weight"], shapes[f"{p}fc2.bias"] = (d, ffn), (d,)
    shapes["audio_tower.ln_post.weight"] = shapes["audio_tower.ln_post.bias"] = (d,)
    shapes["audio_tower.proj.weight"], shapes["audio_tower.proj.bias"] = (a.output_dim, d), (a.output_dim,)
    return shapes


def _whole(hf: str, rows: int) -> tuple[Part, ...]:
    return (Part(hf, 0, rows),)


def _interleave(q: str, k: str | None, v: str, groups: int, q_rows: int, kv_rows: int) -> tuple[Part, ...]:
    """MindSpeed-MM's QKVMergeOp: each of q, k, v cut into ``groups`` chunks, emitted as [q_g, k_g, v_g] per g."""
    parts: list[Part] = []
    for g in range(groups):
        parts += [Part(q, g * q_rows, q_rows), Part(k, g * kv_rows, kv_rows), Part(v, g * kv_rows, kv_rows)]
    return tuple(parts)


def thinker_rules(cfg: ThinkerConfig) -> list[Rule]:
    """Every MM tensor of the thinker, in a fixed order: vision, text, audio (MindSpeed-MM's modality order)."""
    shapes = hf_thinker_shapes(cfg)
    t, v, a = cfg.text, cfg.vision, cfg.audio
    rules: list[Rule] = []

    def add(template: str, modality: str, stage: str, layer: int | None, parts: tuple[Part, ...], split: str) -> None:
        rules.append(Rule(template, modality, stage, layer, parts, split))

    def rename(template: str, modality: str, stage: str, layer: int | None, hf: str, split: str) -> None:
        add(template, modality, stage, layer, _whole(hf, shapes[hf][0]), split)

    def glu(template: str, modality: str, layer: int, gate: str, up: str) -> None:
        add(template, modality, LAYER, layer, _whole(gate, shapes[gate][0]) + _whole(up, shapes[up][0]), GLU)

    # Vision tower (per-head interleave: q, k and v have num_heads groups of head_dim rows).
    vl = LAYER_PREFIX["vit"] + "{}."
    rename("image_encoder.encoder.patch_embed.proj.weight", "vit", FIRST, None, "visual.patch_embed.proj.weight",
           REPLICATE)
    for i in range(v.depth):
        hf = f"visual.blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, val = (f"{hf}attn.{x}.{kind}" for x in "qkv")
            add(vl + f"self_attention.linear_qkv.{kind}", "vit", LAYER, i,
                _interleave(q, k, val, v.num_heads, v.head_dim, v.head_dim), ROW)
        rename(vl + "self_attention.linear_proj.weight", "vit", LAYER, i, f"{hf}attn.proj.weight", COL)
        rename(vl + "self_attention.linear_proj.bias", "vit", LAYER, i, f"{hf}attn.proj.bias", REPLICATE)
        for kind in ("weight", "bias"):
            glu(vl + f"mlp.linear_fc1.{kind}", "vit", i, f"{hf}mlp.gate_proj.{kind}", f"{hf}mlp.up_proj.{kind}")
        rename(vl + "mlp.linear_fc2.weight", "vit", LAYER, i, f"{hf}mlp.down_proj.weight", COL)
        rename(vl + "mlp.linear_fc2.bias", "vit", LAYER, i, f"{hf}mlp.down_proj.bias", REPLICATE)
        rename(vl + "input_layernorm.weight", "vit", LAYER, i, f"{hf}norm1.weight", REPLICATE)
        rename(vl + "pre_mlp_layernorm.weight", "vit", LAYER, i, f"{hf}norm2.weight", REPLICATE)
    rename("image_encoder.projector.layernorm.weight", "vit", LAST, None, "visual.merger.ln_q.weight", REPLICATE)
    for kind in ("weight", "bias"):
        rename(f"image_encoder.projector.encoder.linear_fc1.{kind}", "vit", LAST, None, f"visual.merger.mlp.0.{kind}",
               ROW)
    rename("image_encoder.projector.encoder.linear_fc2.weight", "vit", LAST, None, "visual.merger.mlp.2.weight", COL)
    rename("image_encoder.projector.encoder.linear_fc2.bias", "vit", LAST, None, "visual.merger.mlp.2.bias",
           REPLICATE)

    # Text decoder (per key-value-group interleave).
    tl = LAYER_PREFIX["llm"] + "{}."
    rename("text_decoder.embedding.word_embeddings.weight", "llm", FIRST, None, "model.embed_tokens.weight", ROW)
    group_q_rows = t.num_attention_heads // t.num_key_value_heads * t.head_dim
    for i in range(t.num_hidden_layers):
        hf = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, val = (f"{hf}self_attn.{x}_proj.{kind}" for x in "qkv")
            add(tl + f"self_attention.linear_qkv.{kind}", "llm", LAYER, i,
                _interleave(q, k, val, t.num_key_value_heads, group_q_rows, t.head_dim), ROW)
        rename(tl + "self_attention.linear_proj.weight", "llm", LAYER, i, f"{hf}self_attn.o_proj.weight", COL)
        glu(tl + "mlp.linear_fc1.weight", "llm", i, f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight")
        rename(tl + "mlp.linear_fc2.weight", "llm", LAYER, i, f"{hf}mlp.down_proj.weight", COL)
        rename(tl + "input_layernorm.weight", "llm", LAYER, i, f"{hf}input_layernorm.weight", REPLICATE)
        rename(tl + "pre_mlp_layernorm.weight", "llm", LAYER, i, f"{hf}post_attention_layernorm.weight", REPLICATE)
    rename("text_decoder.decoder.final_layernorm.weight", "llm", LAST, None, "model.norm.weight", REPLICATE)
    rename("text_decoder.output_layer.weight", "llm", LAST, None, "lm_head.weight", ROW)

    # Audio tower (per-head interleave, zero K bias).
    al = LAYER_PREFIX["audio"] + "{}."
    for name in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "audio_bos_eos_token.weight"):
        rename(f"audio_encoder.encoder.{name}", "audio", FIRST, None, f"audio_tower.{name}", REPLICATE)
    for i in range(a.encoder_layers):
        hf = f"audio_tower.layers.{i}."
        q, k, val = (f"{hf}self_attn.{x}_proj.weight" for x in "qkv")
        add(al + "self_attention.linear_qkv.weight", "audio", LAYER, i,
            _interleave(q, k, val, a.encoder_attention_heads, a.head_dim, a.head_dim), ROW)
        q, val = f"{hf}self_attn.q_proj.bias", f"{hf}self_attn.v_proj.bias"
        add(al + "self_attention.linear_qkv.bias", "audio", LAYER, i,
            _interleave(q, None, val, a.encoder_attention_heads, a.head_dim, a.head_dim), ROW)
        rename(al + "self_attention.linear_proj.weight", "audio", LAYER, i, f"{hf}self_attn.out_proj.weight", COL)
        rename(al + "self_attention.linear_proj.bias", "audio", LAYER, i, f"{hf}self_attn.out_proj.bias", REPLICATE)
        for kind in ("weight", "bias"):
            rename(al + f"mlp.linear_fc1.{kind}", "audio", LAYER, i, f"{hf}fc1.{kind}", ROW)
            rename(al + f"input_layernorm.{kind}", "audio", LAYER, i, f"{hf}self_attn_layer_norm.{kind}", REPLICATE)
            rename(al + f"pre_mlp_layernorm.{kind}", "audio", LAYER, i, f"{hf}final_layer_norm.{kind}", REPLICATE)
        rename(al + "mlp.linear_fc2.weight", "audio", LAYER, i, f"{hf}fc2.weight", COL)
        rename(al + "mlp.linear_fc2.bias", "audio", LAYER, i, f"{hf}fc2.bias", REPLICATE)
    for name in ("ln_post.weight", "ln_post.bias", "proj.weight", "proj.bias"):
        rename(f"audio_encoder.encoder.{name}", "audio", LAST, None, f"audio_tower.{name}", REPLICATE)
    return rules


def validate_layout(layout: ParallelLayout, cfg: ThinkerConfig) -> None:
    """Layer sums against the config, and tp_size against every dimension a tensor-parallel split cuts."""
    problems = []
    depth = {"llm": cfg.text.num_hidden_layers, "vit": cfg.vision.depth, "audio": cfg.audio.encoder_layers}
    for modality in MODALITIES:
        layers = layout.layers(modality)
        if sum(layers) != depth[modality]:
            problems.append(f"parallel_config.{modality}_pp_layers {list(layers)} sums to {sum(layers)}, but "
                            f"{DEPTH_FIELD[modality]} is {depth[modality]}")
    tp = layout.tp_size
    if tp > 1:
        t, v, a = cfg.text, cfg.vision, cfg.audio
        cut = [  # each must split into whole pieces: heads (whole q/k/v groups), vocab rows, MLP rows
            ("thinker_config.text_config.num_key_value_heads", t.num_key_value_heads),
            ("thinker_config.text_config.num_attention_heads", t.num_attention_heads),
            ("thinker_config.text_config.vocab_size", t.vocab_size),
            ("thinker_config.text_config.intermediate_size", t.intermediate_size),
            ("thinker_config.vision_config.num_heads", v.num_heads),
            ("thinker_config.vision_config.intermediate_size", v.intermediate_size),
            ("thinker_config.vision_config.hidden_size * spatial_merge_size**2 (merger width)",
             v.hidden_size * v.spatial_merge_size**2),
            ("thinker_config.audio_config.encoder_attention_heads", a.encoder_attention_heads),
            ("thinker_config.audio_config.encoder_ffn_dim", a.encoder_ffn_dim),
        ]
        for field, value in cut:
            if value % tp:
                problems.append(f"parallel_config.tp_size {tp} does not divide {field} = {value}")
    if problems:
        raise ValueError("invalid parallel_config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------ shards and stages


def _full_shape(rule: Rule, hf_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    tail = hf_shapes[rule.hf_names[0]][1:]
    return (sum(p.rows for p in rule.parts), *tail)


def shard_shape(rule: Rule, hf_shapes: Mapping[str, tuple[int, ...]], tp_size: int) -> tuple[int, ...]:
    full = _full_shape(rule, hf_shapes)
    if rule.split in (ROW, GLU):
        return (full[0] // tp_size, *full[1:])
    if rule.split == COL:
        return (full[0], full[1] // tp_size)
    return full


def shard_rects(rule: Rule, hf_shapes: Mapping[str, tuple[int, ...]], tp_size: int,
                tp_rank: int) -> list[tuple[str | None, int, int, int, int, int]]:
    """Where the elements of tensor rank ``tp_rank``'s shard come from, as (hf name or None for zeros, hf row,
    hf col, shard row, rows, cols); shard columns start at 0. The one description both directions use."""
    full = _full_shape(rule, hf_shapes)
    rows, cols = row_cols(full)
    if rule.split == REPLICATE or tp_size == 1:
        regions = [(0, rows, 0, cols, 0)]  # (full row, rows, col, cols, shard row)
    elif rule.split == ROW:
        n = rows // tp_size
        regions = [(tp_rank * n, n, 0, cols, 0)]
    elif rule.split == GLU:
        n = rows // 2 // tp_size
        regions = [(tp_rank * n, n, 0, cols, 0), (rows // 2 + tp_rank * n, n, 0, cols, n)]
    else:
        n = cols // tp_size
        regions = [(0, rows, tp_rank * n, n, 0)]
    out = []
    for r0, nrows, c0, ncols, s0 in regions:
        at = 0
        for part in rule.parts:
            lo, hi = max(r0, at), min(r0 + nrows, at + part.rows)
            if lo < hi:
                out.append((part.hf, part.row0 + lo - at, c0, s0 + lo - r0, hi - lo, ncols))
            at += part.rows
    return out


def placement(rule: Rule, layout: ParallelLayout) -> tuple[int, str]:
    """(pipeline stage, name in that stage's file) of a rule."""
    if rule.stage == FIRST:
        return layout.first_stage(rule.modality), rule.template
    if rule.stage == LAST:
        return layout.last_stage(rule.modality), rule.template
    stage = layout.stage_of_layer(rule.modality, rule.layer)
    return stage, rule.template.format(rule.layer - layout.stage_start(rule.modality, stage))


@dataclass(frozen=True)
class Stored:
    """A tensor somewhere in a CopyPlan source: index, absolute byte offset, dtype, shape."""

    source: int
    offset: int
    dtype: str
    shape: tuple[int, ...]

    def loc(self) -> Loc:
        return Loc(self.source, self.offset, row_cols(self.shape)[1], ITEMSIZE[self.dtype])


def _stored(entry: TensorEntry, source: int) -> Stored:
    return Stored(source, entry.begin, entry.dtype, entry.shape)


def _listing(names: Sequence[str], limit: int = 12) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_thinker_tensors(found: Mapping[str, tuple[str, tuple[int, ...]]], cfg: ThinkerConfig, where: str,
                          names: set[str] | None = None) -> None:
    """HF-named thinker tensors ``{name: (dtype, shape)}`` against the config (all of them, or ``names``): one
    error listing every mismatch."""
    expected = {n: shape for n, shape in hf_thinker_shapes(cfg).items() if names is None or n in names}
    problems = []
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    misshaped = [f"{n} {list(found[n][1])} (config: {list(expected[n])})"
                 for n in expected.keys() & found.keys() if tuple(found[n][1]) != expected[n]]
    bad_dtype = [f"{n} {found[n][0]}" for n in found.keys() & expected.keys() if found[n][0] not in FLOAT_DTYPES]
    if missing:
        problems.append(f"missing ({len(missing)}): {_listing(list(missing))}")
    if unexpected:
        problems.append(f"not thinker tensors of this config ({len(unexpected)}): {_listing(list(unexpected))}")
    if misshaped:
        problems.append(f"wrong shape ({len(misshaped)}): {_listing(misshaped)}")
    if bad_dtype:
        problems.append(f"dtype not F32/BF16/F16 ({len(bad_dtype)}): {_listing(bad_dtype)}")
    if not problems:
        for rule in thinker_rules(cfg):
            if names is not None and not set(rule.hf_names) <= names:
                continue
            dtypes = {found[h][0] for h in rule.hf_names}
            if len(dtypes) > 1:
                problems.append(f"{', '.join(rule.hf_names)} are fused into {rule.name} but have dtypes "
                                f"{sorted(dtypes)}")
    if problems:
        raise ValueError(f"{where}: thinker tensors do not match the config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------ HF and MM checkpoints on disk


@dataclass
class HFCheckpoint:
    """A validated Hugging Face Qwen2.5-Omni directory (hub layout or thinker-only)."""

    path: Path
    config: ThinkerConfig
    entries: dict[str, TensorEntry]  # every tensor, by its name in the checkpoint
    file_of: dict[str, Path]  # every tensor's file
    prefix: str  # "thinker." for the hub layout, "" for a thinker-only save

    def thinker(self) -> dict[str, TensorEntry]:
        """Thinker tensors by HF parameter name (no prefix)."""
        return {thinker_key(n): e for n, e in self.entries.items() if thinker_key(n) is not None}


def open_hf_checkpoint(hf_dir: str | Path) -> HFCheckpoint:
    """Read config.json and every safetensors header of ``hf_dir`` and check the thinker tensors against the
    config (names, shapes, dtypes); no tensor bytes are read."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"cfg.hf_config.hf_dir: {hf_dir} is not a directory")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"cfg.hf_config.hf_dir: {hf_dir} has no config.json")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"cfg.hf_config.hf_dir: {config_path} is not valid JSON ({err})") from None
    thinker_raw = raw.get("thinker_config", raw)
    if "thinker_config" not in raw and raw.get("model_type") != "qwen2_5_omni_thinker":
        raise ValueError(f"cfg.hf_config.hf_dir: {config_path} is not a Qwen2.5-Omni config (model_type "
                         f"{raw.get('model_type')!r}, no thinker_config)")
    if (thinker_raw.get("text_config") or {}).get("tie_word_embeddings"):
        # MindSpeed-MM copies the embedding into output_layer for PP > 1; the thinker here has its own lm_head.
        raise ValueError(f"cfg.hf_config.hf_dir: {config_path} ties the word embeddings "
                         "(text_config.tie_word_embeddings), which Qwen2.5-Omni and omni_fast do not do")
    config = ThinkerConfig.from_dict(raw)
    try:
        files = safetensors_files(hf_dir)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"cfg.hf_config.hf_dir: {err}") from None
    entries: dict[str, TensorEntry] = {}
    file_of: dict[str, Path] = {}
    for file in files:
        for name, entry in read_header(file).items():
            if name in entries:
                raise ValueError(f"cfg.hf_config.hf_dir: {name} is in both {file_of[name].name} and {file.name}")
            entries[name], file_of[name] = entry, file
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        wrong = [n for n, f in weight_map.items() if n not in entries or file_of[n].name != f]
        if wrong:
            raise ValueError(f"cfg.hf_config.hf_dir: {index} places tensors where they are not: {_listing(wrong)}")
    prefixed = {n.startswith(THINKER_PREFIX) for n in entries if thinker_key(n) is not None}
    if len(prefixed) > 1:
        raise ValueError(f"cfg.hf_config.hf_dir: {hf_dir} mixes thinker tensors with and without 'thinker.'")
    ckpt = HFCheckpoint(hf_dir, config, entries, file_of, THINKER_PREFIX if prefixed == {True} else "")
    thinker = ckpt.thinker()
    check_thinker_tensors({n: (e.dtype, e.shape) for n, e in thinker.items()}, config, f"cfg.hf_config.hf_dir {hf_dir}")
    return ckpt


@dataclass
class MMCheckpoint:
    """A validated MM iteration directory: its layout and every rank's tensors."""

    iteration_dir: Path
    layout: ParallelLayout
    files: dict[tuple[int, int], Path]  # (tp rank, pp rank) -> weights file
    entries: dict[tuple[int, int], dict[str, TensorEntry]]


def _stage_layers(names: Sequence[str], modality: str, where: Path) -> int:
    prefix = LAYER_PREFIX[modality]
    found = {int(n[len(prefix):].split(".", 1)[0]) for n in names if n.startswith(prefix)}
    if found != set(range(len(found))):
        raise ValueError(f"{where}: {modality} layers {sorted(found)} are not numbered 0..n-1")
    return len(found)


def open_mm_checkpoint(mm_dir: str | Path, cfg: ThinkerConfig, layout: ParallelLayout | None = None,
                       iteration: int | str | None = None) -> MMCheckpoint:
    """Find the iteration (``latest_checkpointed_iteration.txt`` unless ``iteration`` is given), read the layout
    from the rank directories and the layer names, check it against ``layout`` if given, and check every tensor."""
    mm_dir = Path(mm_dir)
    if iteration is None:
        it_dir = read_latest_iteration(mm_dir)
    else:
        it_dir = mm_dir / iteration_dir_name(iteration)
        if not it_dir.is_dir():
            raise FileNotFoundError(f"cfg.mm_dir: {it_dir} does not exist")
    tp_size, pp_size = find_rank_dirs(it_dir)
    files, entries = {}, {}
    for tp in range(tp_size):
        for pp in range(pp_size):
            file = it_dir / rank_dir_name(tp, pp, pp_size) / WEIGHTS_FILE
            if not file.is_file():
                raise FileNotFoundError(f"cfg.mm_dir: {file} is missing")
            files[tp, pp], entries[tp, pp] = file, read_header(file)
    counts = {m: tuple(_stage_layers(list(entries[0, pp]), m, files[0, pp]) for pp in range(pp_size))
              for m in MODALITIES}
    found = ParallelLayout(counts["llm"], counts["vit"], counts["audio"], tp_size)
    if layout is not None:
        if layout.tp_size != tp_size:
            raise ValueError(f"parallel_config.tp_size is {layout.tp_size}, but {it_dir} has {tp_size} tensor-parallel "
                             "rank(s)")
        for m in MODALITIES:
            if layout.layers(m) != found.layers(m):
                raise ValueError(f"parallel_config.{m}_pp_layers is {list(layout.layers(m))}, but {it_dir} holds "
                                 f"{list(found.layers(m))} {m} layers per stage")
    try:
        validate_layout(found, cfg)
    except ValueError as err:
        raise ValueError(f"cfg.mm_dir: {it_dir} holds the layout {found.as_dict()}, which does not fit the config: "
                         f"{err}") from None
    hf_shapes = hf_thinker_shapes(cfg)
    expected: dict[tuple[int, int], dict[str, tuple[int, ...]]] = defaultdict(dict)
    for rule in thinker_rules(cfg):
        stage, local = placement(rule, found)
        for tp in range(tp_size):
            expected[tp, stage][local] = shard_shape(rule, hf_shapes, tp_size)
    problems = []
    for key, file in files.items():
        have = entries[key]
        want = expected[key]
        missing, extra = want.keys() - have.keys(), have.keys() - want.keys()
        wrong = [f"{n} {list(have[n].shape)} (expected {list(want[n])})"
                 for n in want.keys() & have.keys() if have[n].shape != want[n]]
        bad = [f"{n} {have[n].dtype}" for n in want.keys() & have.keys() if have[n].dtype not in FLOAT_DTYPES]
        for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong), ("bad dtype", bad)):
            if items:
                problems.append(f"{file.parent.name}: {label} ({len(items)}): {_listing(list(items))}")
    if problems:
        raise ValueError(f"cfg.mm_dir: {it_dir} does not hold this config's thinker in layout {found.as_dict()}:\n  "
                         + "\n  ".join(problems))
    return MMCheckpoint(it_dir, found, files, entries)


# ------------------------------------------------------------------ plans


def placed_rules(cfg: ThinkerConfig, layout: ParallelLayout,
                 stages: Sequence[int] | None = None) -> list[tuple[Rule, int, str]]:
    """(rule, stage, name in the stage's file) for every rule, or for those on ``stages`` only."""
    if stages is not None:
        bad = [s for s in stages if not 0 <= s < layout.pp_size]
        if bad:
            raise ValueError(f"stages {bad} do not exist in a {layout.pp_size}-stage pipeline")
    placed = [(rule, *placement(rule, layout)) for rule in thinker_rules(cfg)]
    return [p for p in placed if stages is None or p[1] in stages]


def plan_to_mm(plan: CopyPlan, tensors: Mapping[str, Stored], cfg: ThinkerConfig, layout: ParallelLayout,
               iteration_dir: Path, stages: Sequence[int] | None = None) -> list[Path]:
    """Add to ``plan`` the MM files of ``layout`` (of ``stages`` only, if given) built from HF-named thinker
    tensors; returns the files."""
    hf_shapes = hf_thinker_shapes(cfg)
    per_file: dict[tuple[int, int], list[tuple[str, Rule, str, tuple[int, ...]]]] = defaultdict(list)
    for rule, stage, local in placed_rules(cfg, layout, stages):
        dtype = tensors[rule.hf_names[0]].dtype
        for tp in range(layout.tp_size):
            per_file[tp, stage].append((local, rule, dtype, shard_shape(rule, hf_shapes, layout.tp_size)))
    paths = []
    for tp in range(layout.tp_size):
        for pp in range(layout.pp_size) if stages is None else sorted(set(stages)):
            rank_dir = iteration_dir / rank_dir_name(tp, pp, layout.pp_size)
            rank_dir.mkdir(parents=True, exist_ok=True)
            items = per_file[tp, pp]
            header, offsets = build_header((local, dtype, shape) for local, _, dtype, shape in items)
            size = len(header) + sum(math.prod(shape) * ITEMSIZE[dtype] for _, _, dtype, shape in items)
            sink = plan.sink(rank_dir / WEIGHTS_FILE, size)
            plan.add_bytes(sink, 0, header)
            for local, rule, dtype, shape in items:
                rects = [Rect(None if hf is None else tensors[hf].loc(), hf_row, hf_col, sh_row, 0, rows, cols)
                         for hf, hf_row, hf_col, sh_row, rows, cols in shard_rects(rule, hf_shapes, layout.tp_size, tp)]
                plan.add_tensor(sink, offsets[local], shape, ITEMSIZE[dtype], rects)
            paths.append(rank_dir / WEIGHTS_FILE)
    return paths


@dataclass(frozen=True)
class HFTarget:
    """An HF thinker tensor rebuilt from MM shards: dtype, shape and the rectangles that tile it."""

    dtype: str
    shape: tuple[int, ...]
    rects: tuple[Rect, ...]


def plan_from_mm(plan: CopyPlan, mm: MMCheckpoint, cfg: ThinkerConfig,
                 stages: Sequence[int] | None = None) -> dict[str, HFTarget]:
    """Add the MM files to ``plan`` as sources; return how to rebuild each HF-named thinker tensor (those held by
    ``stages`` only, if given) from them."""
    layout, hf_shapes = mm.layout, hf_thinker_shapes(cfg)
    sources = {key: plan.source(path) for key, path in mm.files.items()
               if stages is None or key[1] in stages}
    rects: dict[str, list[Rect]] = defaultdict(list)
    dtypes: dict[str, set[str]] = defaultdict(set)
    for rule, stage, local in placed_rules(cfg, layout, stages):
        # A replicated tensor is read from tensor rank 0, as MindSpeed-MM's merge_by_tp does.
        for tp in range(1 if rule.split == REPLICATE else layout.tp_size):
            shard = _stored(mm.entries[tp, stage][local], sources[tp, stage])
            for hf, hf_row, hf_col, sh_row, rows, cols in shard_rects(rule, hf_shapes, layout.tp_size, tp):
                if hf is not None:  # zero rows (the audio K bias) have no HF tensor: dropped
                    rects[hf].append(Rect(shard.loc(), sh_row, 0, hf_row, hf_col, rows, cols))
                    dtypes[hf].add(shard.dtype)
    mixed = [f"{n} {sorted(d)}" for n, d in dtypes.items() if len(d) > 1]
    if mixed:
        raise ValueError(f"cfg.mm_dir: shards of one tensor disagree on dtype: {_listing(mixed)}")
    out = {}
    for name, parts in rects.items():
        shape = hf_shapes[name]
        rows, cols = row_cols(shape)
        if sum(r.rows * r.cols for r in parts) != rows * cols:
            raise AssertionError(f"conversion rules do not tile {name}")  # a bug in the rules, not in the input
        out[name] = HFTarget(dtypes[name].pop(), shape, tuple(parts))
    if stages is None and out.keys() != hf_shapes.keys():
        raise AssertionError("conversion rules do not cover every thinker tensor")
    return out


# ------------------------------------------------------------------ directory-level operations


def check_output_dir(path: Path, field: str) -> None:
    """An output directory must not exist yet or be empty."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{field}: {path} exists and is not an empty directory; remove it or choose another")


@contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """A hidden sibling directory to write into, renamed to ``final`` only when the block completes. A crash leaves
    ``.NAME.tmp-PID`` behind, never a ``final`` that looks complete; an exception removes it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, final)  # replaces a missing or empty final directory atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion wrote."""

    files: tuple[Path, ...]
    bytes_written: int
    seconds: float

    def summary(self) -> str:
        gb = self.bytes_written / 1e9
        return (f"wrote {len(self.files)} safetensors files, {gb:.3f} GB in {self.seconds:.2f} s "
                f"({gb / max(self.seconds, 1e-9):.2f} GB/s)")


BACKENDS = ("compiled", "numpy")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def hf_to_mm(hf_dir: str | Path, mm_dir: str | Path, layout: ParallelLayout, *, backend: str = "compiled",
             threads: int = 0) -> ConvertReport:
    """``mm-convert Qwen2_5_OmniConverter hf_to_mm``: write ``mm_dir/release/mp_rank_*/model.safetensors`` and
    ``mm_dir/latest_checkpointed_iteration.txt`` = ``release``. ``backend="numpy"`` runs the oracle."""
    start = time.perf_counter()
    _check_backend(backend)
    hf = open_hf_checkpoint(hf_dir)
    validate_layout(layout, hf.config)
    mm_dir = Path(mm_dir)
    check_output_dir(mm_dir, "cfg.mm_dir")
    with staged_output(mm_dir) as tmp:
        if backend == "compiled":
            plan = CopyPlan()
            tensors = {name: _stored(entry, plan.source(hf.file_of[hf.prefix + name]))
                       for name, entry in hf.thinker().items()}
            files = plan_to_mm(plan, tensors, hf.config, layout, tmp / RELEASE)
            plan.run(threads)
        else:
            files = oracle.hf_to_mm(hf, layout, tmp / RELEASE)
        (tmp / LATEST_FILE).write_text(RELEASE)  # MindSpeed-MM writes str(iteration), no newline
        written = sum(f.stat().st_size for f in files)
    return ConvertReport(tuple(mm_dir / f.relative_to(tmp) for f in files), written, time.perf_counter() - start)


def _copy_non_weights(src: Path, dst: Path) -> None:
    """Every file of the HF directory except the weights (configs, tokenizer, processor, index...), as MindSpeed-MM's
    copy_files_except_suffix does, subdirectories included."""
    for item in sorted(src.rglob("*")):
        if item.is_file() and item.suffix != ".safetensors":
            target = dst / item.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)


def hf_output_files(hf: HFCheckpoint, converted: Mapping[str, tuple[str, tuple[int, ...]]]
                    ) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    """The files mm_to_hf writes: the original file names, each holding the tensors it held originally (as listed
    by the index, or by each file's header when there is no index), thinker tensors with their converted
    (dtype, shape). Returns {file name: [(checkpoint name, dtype, shape)]}."""
    out: dict[str, list[tuple[str, str, tuple[int, ...]]]] = defaultdict(list)
    for name, entry in hf.entries.items():
        key = thinker_key(name)
        dtype, shape = converted[key] if key is not None else (entry.dtype, entry.shape)
        out[hf.file_of[name].name].append((name, dtype, shape))
    return dict(out)


def _update_index_total(index: Path, hf: HFCheckpoint, new_total: int) -> None:
    """Keep ``metadata.total_size`` of a copied index true when conversion changed the byte count (a dtype change)."""
    if not index.is_file() or new_total == sum(e.nbytes for e in hf.entries.values()):
        return
    data = json.loads(index.read_text())
    data.setdefault("metadata", {})["total_size"] = new_total
    index.write_text(json.dumps(data, indent=2) + "\n")


def mm_to_hf(mm_dir: str | Path, hf_dir: str | Path, save_hf_dir: str | Path, layout: ParallelLayout | None = None,
             *, backend: str = "compiled", threads: int = 0) -> ConvertReport:
    """``mm-convert Qwen2_5_OmniConverter mm_to_hf``: the thinker from the MM checkpoint merged with the original HF
    directory (talker, token2wav and every non-weight file kept), sharded like the original. ``layout`` (the CLI's
    parallel_config) is checked against the checkpoint; None reads it from the checkpoint."""
    start = time.perf_counter()
    _check_backend(backend)
    hf = open_hf_checkpoint(hf_dir)
    mm = open_mm_checkpoint(mm_dir, hf.config, layout)
    save_hf_dir = Path(save_hf_dir)
    check_output_dir(save_hf_dir, "cfg.save_hf_dir")
    for field, other in (("cfg.hf_config.hf_dir", hf.path), ("cfg.mm_dir", Path(mm_dir))):
        if save_hf_dir.resolve().is_relative_to(other.resolve()):
            raise ValueError(f"cfg.save_hf_dir: {save_hf_dir} must not be inside {field} {other}")
    with staged_output(save_hf_dir) as tmp:
        _copy_non_weights(hf.path, tmp)
        if backend == "compiled":
            plan = CopyPlan()
            targets = plan_from_mm(plan, mm, hf.config)
            layout_of = hf_output_files(hf, {n: (t.dtype, t.shape) for n, t in targets.items()})
            files = []
            for file_name, items in layout_of.items():
                header, offsets = build_header(items)
                size = len(header) + sum(math.prod(shape) * ITEMSIZE[dtype] for _, dtype, shape in items)
                sink = plan.sink(tmp / file_name, size)
                plan.add_bytes(sink, 0, header)
                for name, dtype, shape in items:
                    key = thinker_key(name)
                    if key is None:  # talker / token2wav: copied whole from the original file
                        entry = hf.entries[name]
                        src = Loc(plan.source(hf.file_of[name]), entry.begin, row_cols(shape)[1], ITEMSIZE[dtype])
                        rects: Sequence[Rect] = [Rect(src, 0, 0, 0, 0, *row_cols(shape))]
                    else:
                        rects = targets[key].rects
                    plan.add_tensor(sink, offsets[name], shape, ITEMSIZE[dtype], rects)
                files.append(tmp / file_name)
            plan.run(threads)
        else:
            files = oracle.mm_to_hf(mm, hf, tmp)
        written = sum(f.stat().st_size for f in files)
        _update_index_total(tmp / INDEX_FILE, hf, sum(e.nbytes for f in files for e in read_header(f).values()))
    return ConvertReport(tuple(save_hf_dir / f.relative_to(tmp) for f in files), written, time.perf_counter() - start)


# ------------------------------------------------------------------ in memory, for the trainer


_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def read_mm_thinker(mm_dir: str | Path, config: ThinkerConfig, layout: ParallelLayout | None = None, *,
                    iteration: int | str | None = None, stages: Sequence[int] | None = None,
                    threads: int = 0) -> dict[str, np.ndarray]:
    """The thinker tensors of an MM checkpoint, HF-named like ``Qwen2_5OmniThinker``'s parameters (no ``thinker.``),
    in their stored dtype (F32/F16 as numpy, BF16 as MindSpore's numpy bfloat16). Reads the iteration named by
    ``latest_checkpointed_iteration.txt`` unless ``iteration`` (a number or ``"release"``) is given; the PP/TP
    layout comes from the directory (checked against ``layout`` if given). ``stages``: only the tensors those
    pipeline stages hold (a pipeline rank loading its part)."""
    mm = open_mm_checkpoint(mm_dir, config, layout, iteration)
    plan = CopyPlan()
    targets = plan_from_mm(plan, mm, config, stages)
    buffers = {}
    for name, target in targets.items():
        buf = np.empty(math.prod(target.shape) * ITEMSIZE[target.dtype], dtype=np.uint8)
        plan.add_tensor(plan.sink(buf, buf.nbytes), 0, target.shape, ITEMSIZE[target.dtype], target.rects)
        buffers[name] = buf
    plan.run(threads)
    return {name: buf.view(numpy_dtype(targets[name].dtype)).reshape(targets[name].shape)
            for name, buf in buffers.items()}


def write_mm_thinker(state: Mapping[str, Any], iteration_dir: str | Path, config: ThinkerConfig,
                     layout: ParallelLayout, *, stages: Sequence[int] | None = None, threads: int = 0) -> list[Path]:
    """Write HF-named thinker tensors (numpy arrays: float32, float16 or a bfloat16 numpy type; names with or
    without ``thinker.``) as ``iteration_dir/mp_rank_TT[_PPP]/model.safetensors`` for ``layout``. With ``stages``,
    only those stages' files are written and ``state`` holds exactly the tensors they need (a pipeline rank saving
    its part). The files must not exist yet; rank directories are created. Returns the files written."""
    validate_layout(layout, config)
    names = None if stages is None else {h for r, _, _ in placed_rules(config, layout, stages) for h in r.hf_names}
    arrays: dict[str, np.ndarray] = {}
    for name, value in state.items():
        key = thinker_key(name)
        if key is None:
            raise ValueError(f"write_mm_thinker: {name} is not a thinker tensor")
        arrays[key] = np.ascontiguousarray(value)
    bad = [f"{n} {a.dtype}" for n, a in arrays.items() if a.dtype.name not in _DTYPE_CODES]
    if bad:
        raise ValueError(f"write_mm_thinker: dtypes must be float32, float16 or bfloat16: {_listing(bad)}")
    check_thinker_tensors({n: (_DTYPE_CODES[a.dtype.name], a.shape) for n, a in arrays.items()}, config,
                          "write_mm_thinker", names)
    plan = CopyPlan()
    tensors = {n: Stored(plan.source(a.reshape(-1).view(np.uint8)), 0, _DTYPE_CODES[a.dtype.name], a.shape)
               for n, a in arrays.items()}
    files = plan_to_mm(plan, tensors, config, layout, Path(iteration_dir), stages)
    plan.run(threads)
    return files
