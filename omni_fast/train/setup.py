"""Turn the command line into a ready ``Trainer``: model structure, weights, data, and the checks between them.

What ``--load`` may be (decided by what the directory holds):

* a Hugging Face Qwen2.5-Omni directory (``config.json`` + safetensors): weights loaded, structure from its config
  unless ``--mm-model`` is given (then both must agree; loading says what differs);
* a directory with ``latest_checkpointed_iteration.txt``: ``release`` (converted by ``mm-convert hf_to_mm``: weights
  only) or an iteration saved by this trainer (weights, and optimizer/RNG state unless ``--no-load-*``);
* absent: a freshly initialised model of the ``--mm-model`` structure (seeded by ``--seed``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from omni_fast import parallel
from omni_fast.config.mm_model import ModelSpec, load_model_json
from omni_fast.config.model_config import ThinkerConfig
from omni_fast.config.train_config import STRUCTURAL_FLAGS, STRUCTURAL_SWITCHES, ParsedArgs
from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.ops import dispatch
from omni_fast.train import checkpoint as ckpt
from omni_fast.train.trainer import Trainer

logger = logging.getLogger("omni_fast.train")

PRESETS = Path(__file__).resolve().parent.parent / "config" / "presets"
DEMO_ROOT = Path("outputs") / "omni_fast_demo"


def demo_defaults(parsed: ParsedArgs) -> None:
    """The embedded default: with no --mm-data/--mm-model/--load, a tiny Thinker on the generated demo data."""
    c = parsed.config
    if c.mm_data is None:
        from omni_fast.data import ensure_demo_data

        c.mm_data = str(ensure_demo_data(DEMO_ROOT / "data") / "data.json")
        logger.info("no --mm-data: using the generated demo data %s", c.mm_data)
    if c.mm_model is None and c.load is None:
        c.mm_model = str(PRESETS / "model_tiny.json")
        logger.info("no --mm-model and no --load: a tiny Thinker (%s), freshly initialised", c.mm_model)


def classify_load(path: str | None) -> tuple[str | None, Path | None]:
    """('hf' | 'release' | 'iteration' | None, directory to read)."""
    if path is None:
        return None, None
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--load {root}: no such directory")
    latest = ckpt.read_latest(root)
    if latest is not None:
        target = ckpt.checkpoint_dir(root, latest)
        if not target.is_dir():
            raise FileNotFoundError(f"--load {root}: {ckpt.LATEST_FILE} says {latest!r} but {target} does not exist")
        return ("release" if latest == "release" else "iteration"), target
    if (root / "config.json").is_file():
        return "hf", root
    raise FileNotFoundError(
        f"--load {root}: neither a Hugging Face model directory (config.json) nor a checkpoint directory "
        f"({ckpt.LATEST_FILE})"
    )


def model_spec(parsed: ParsedArgs, load_kind: str | None, load_dir: Path | None) -> ModelSpec:
    c = parsed.config
    if c.mm_model:
        return load_model_json(c.mm_model)
    if load_kind == "hf":
        return ModelSpec.from_thinker(ThinkerConfig.from_file(load_dir / "config.json"))
    if load_kind == "iteration" and (load_dir / "model.json").is_file():
        return load_model_json(load_dir / "model.json")
    raise ValueError(
        "--mm-model is required unless --load is a Hugging Face directory or a checkpoint of this trainer "
        "(a converted release directory holds weights only, as in MindSpeed-MM)"
    )


def warn_structural_flags(parsed: ParsedArgs, spec: ModelSpec) -> None:
    """model.json owns the structure: a disagreeing command-line value is ignored, naming both values."""
    text = spec.thinker.text
    actual = {
        "num_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "ffn_hidden_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads,
        "num_query_groups": text.num_key_value_heads,
        "vocab_size": text.vocab_size,
        "rotary_base": text.rope_theta,
        "normalization": "RMSNorm",
    }
    for flag, value in parsed.structural.items():
        if flag in STRUCTURAL_SWITCHES:
            continue
        model_value = actual.get(flag, spec.raw.get("text_decoder", {}).get(STRUCTURAL_FLAGS[flag][1]))
        if model_value is not None and value != model_value:
            logger.warning(
                "--%s %s ignored: the model structure says %s (%s owns the structure)",
                flag.replace("_", "-"),
                value,
                model_value,
                "model.json" if spec.raw else "config.json",
            )
    for flag, why in parsed.no_effect.items():
        logger.info("--%s accepted, no effect: %s", flag.replace("_", "-"), why)


def check_token_ids(spec: ModelSpec, processor: Any, data_kinds: set[str]) -> None:
    """The tokenizer's media ids must be the model's, and img_context_token_id must fit the data."""
    t = spec.thinker
    for name, model_id in (("image", t.image_token_id), ("video", t.video_token_id), ("audio", t.audio_token_id)):
        data_id = processor.ids[name]
        if data_id != model_id:
            raise ValueError(
                f"the tokenizer's {name} token id is {data_id} but the model's is {model_id}: "
                "model_name_or_path (data.json) and the model (model.json / --load) do not belong together"
            )
    ctx = spec.img_context_token_id
    if ctx is None:
        return
    meaning = {t.image_token_id: "image", t.video_token_id: "video"}.get(ctx)
    others = {k for k in ("image", "video") if k in data_kinds and k != meaning}
    if others:
        logger.warning(
            "model.json img_context_token_id %s marks %s features, but the data holds %s: omni_fast places image "
            "features at <|IMAGE|> (%s) and video features at <|VIDEO|> (%s) whatever this key says, so nothing is "
            "misplaced; set img_context_token_id to match your data to silence this",
            ctx,
            meaning or "no known",
            " and ".join(sorted(others)),
            t.image_token_id,
            t.video_token_id,
        )


def build_trainer(parsed: ParsedArgs) -> Trainer:
    from omni_fast.data import OmniCollator, build_dataset, load_data_config

    c = parsed.config
    demo_defaults(parsed)
    load_kind, load_dir = classify_load(c.load)
    spec = model_spec(parsed, load_kind, load_dir)
    warn_structural_flags(parsed, spec)
    context = parallel.initialize(c, spec)  # parallel settings checked before any work; joins msrun's cluster
    for flag in ("use_flash_attn", "use_fused_rmsnorm"):
        if getattr(c, flag):
            logger.info(
                "--%s: the fused kernels are always used where a backend can serve the input (Ascend: MindSpore's "
                "native ops; CPU: omni_fast's kernels); `python -c 'import omni_fast.ops.%s as m; print(m.explain())'` "
                "says which serves here",
                flag.replace("_", "-"),
                "attention" if flag == "use_flash_attn" else "rms_norm",
            )
    device = dispatch.device_target()
    dtype = "bfloat16" if c.bf16 and device == "Ascend" else "float32"
    if c.bf16 and dtype == "float32":
        logger.warning("--bf16 on %s: MindSpore computes no bf16 here; training in float32", device)

    data_config = load_data_config(c.mm_data)
    dataset = build_dataset(data_config, c.seq_length)
    kinds = {k for r in dataset.records for k, media in (("image", r.images), ("video", r.videos)) if media}
    check_token_ids(spec, dataset.processor, kinds)
    collate = OmniCollator.from_processor(dataset.processor, label_pad_ignored=data_config.label_pad_ignored)

    if load_kind == "hf":
        model = Qwen2_5OmniThinker.from_pretrained(load_dir, dtype=dtype)
        if c.mm_model and dataclasses.asdict(model.config) != dataclasses.asdict(spec.thinker):
            raise ValueError(f"--mm-model {c.mm_model} describes another structure than --load {c.load}/config.json")
    else:
        model = Qwen2_5OmniThinker(spec.thinker, dtype=dtype)
        model.init_random(seed=c.seed)
    trainer = parallel.make_trainer(c, spec, model, dataset, collate, context)
    if load_kind == "iteration":
        trainer.resume_from(load_dir)
    elif load_kind == "release":
        from mindspore import Tensor

        from omni_fast.convert import read_mm_thinker

        tensors = read_mm_thinker(load_dir.parent, spec.thinker, iteration="release")
        trainer.load_weights({name: Tensor(value) for name, value in tensors.items()}, str(load_dir))
    if trainer.recomputed_layers:
        logger.info("recomputation (model.json recompute_*): layers marked per module %s", trainer.recomputed_layers)
    logger.info(
        "model: %s trainable parameters by module %s; data: %d samples; global batch %d = micro %d x accumulation %d",
        sum(trainer.trainable_counts.values()),
        trainer.trainable_counts,
        len(dataset),
        trainer.global_batch_size,
        c.micro_batch_size,
        trainer.accumulation_steps,
    )
    return trainer
