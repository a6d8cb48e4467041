"""Training flags: the Megatron-style command line of MindSpeed-MM's fine-tune script, as one dataclass.

Every flag of the guide's ``finetune_qwen2_5_omni_7b.sh`` is accepted. Flags that set training behaviour are
fields of ``TrainConfig``. Flags that describe model structure belong to ``model.json`` (the guide: "与模型结构相关的
参数并不生效"): they are read, compared with the model and, where they disagree, ignored with a warning. Flags with no
meaning here (Ascend-only fusions, Megatron plumbing) are accepted and logged with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

LOSS_MODES = ("default", "per_sample", "per_token")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
NAN_POLICIES = ("skip", "stop")


def _flag(help: str, **kwargs: Any) -> Any:
    return field(metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    # ---- inputs and outputs
    mm_data: str | None = _flag("data.json (MindSpeed-MM keys); default: the generated demo data", default=None)
    mm_model: str | None = _flag("model.json (MindSpeed-MM keys); default: from --load's config.json", default=None)
    load: str | None = _flag(
        "checkpoint to start from: a Hugging Face Qwen2.5-Omni directory, a converted MM directory (release) or a "
        "--save directory (resumes from latest_checkpointed_iteration.txt)",
        default=None,
    )
    save: str | None = _flag("directory for iter_NNNNNNN/ checkpoints", default=None)
    metrics_path: str | None = _flag("JSON-lines metrics file (default: SAVE/metrics.jsonl)", default=None)
    loss_curve: str | None = _flag("write a PNG of the loss curve here at the end (needs matplotlib)", default=None)
    # ---- batch and schedule
    micro_batch_size: int = _flag("samples per micro-batch", default=1)
    global_batch_size: int | None = _flag(
        "samples per optimizer step; gradient accumulation = global / (micro * data-parallel)", default=None
    )
    seq_length: int = _flag("maximum tokens per sample (the data cutoff)", default=1024)
    train_iters: int = _flag("optimizer steps to run", default=30)
    lr: float = _flag("peak learning rate", default=1e-5)
    min_lr: float = _flag("learning rate at the end of the decay", default=0.0)
    lr_decay_style: str = _flag(f"one of {', '.join(LR_DECAY_STYLES)}", default="cosine")
    lr_warmup_fraction: float | None = _flag("fraction of --train-iters spent in linear warmup", default=None)
    lr_warmup_iters: int = _flag("warmup steps (if --lr-warmup-fraction is not given)", default=0)
    lr_decay_iters: int | None = _flag("steps over which to decay (default: --train-iters)", default=None)
    weight_decay: float = _flag("decoupled (AdamW) weight decay", default=0.01)
    clip_grad: float = _flag("clip the global gradient norm to this (0: no clipping)", default=1.0)
    adam_beta1: float = _flag("AdamW beta1", default=0.9)
    adam_beta2: float = _flag("AdamW beta2", default=0.999)
    adam_eps: float = _flag("AdamW epsilon", default=1e-8)
    seed: int = _flag("seed for weights initialisation, data order and dropout", default=42)
    bf16: bool = _flag("bf16 weights and compute where the device can (Ascend); fp32 compute on CPU", default=False)
    # ---- loss
    calculate_per_sample_loss: bool = _flag("mean over samples of each sample's token mean", default=False)
    calculate_per_token_loss: bool = _flag("sum over the global batch / its valid-token count", default=False)
    # ---- checkpoints
    save_interval: int | None = _flag("save every N steps (and at the end)", default=None)
    no_load_optim: bool = _flag("do not load optimizer state from --load", default=False)
    no_load_rng: bool = _flag("do not load RNG state from --load", default=False)
    no_save_optim: bool = _flag("do not save optimizer state", default=False)
    no_save_rng: bool = _flag("do not save RNG state", default=False)
    # ---- logging
    log_interval: int = _flag("log every N steps", default=1)
    log_tps: bool = _flag("log tokens per sample and tokens per second", default=False)
    nan_policy: str = _flag(
        "on a NaN/inf loss or gradient: 'skip' the update (logged with the batch's sample ids) or 'stop'",
        default="skip",
    )
    gc_interval: int = _flag(
        "Python's cyclic garbage collector runs every N steps (young generations only) instead of at random points "
        "inside steps, as torchtitan does; 0 leaves it automatic",
        default=50,
    )
    # ---- parallelism and kernels
    tensor_model_parallel_size: int = _flag("tensor parallel size (only 1 is supported)", default=1)
    pipeline_model_parallel_size: int = _flag("pipeline stages", default=1)
    context_parallel_size: int = _flag("context parallel size (only 1 is supported)", default=1)
    use_distributed_optimizer: bool = _flag("shard optimizer state across data-parallel ranks", default=False)
    enable_dummy_optimizer: bool = _flag("allow a pipeline stage whose parameters are all frozen", default=False)
    use_flash_attn: bool = _flag("fused attention (our CPU kernel, flash_attention_score on Ascend)", default=False)
    use_fused_rmsnorm: bool = _flag("fused RMSNorm (our CPU kernel, rms_norm on Ascend)", default=False)
    num_workers: int = _flag("data loading workers", default=2)
    jit: bool = _flag("compile the training step with ms.jit (off: PyNative)", default=True)

    @property
    def loss_mode(self) -> str:
        if self.calculate_per_token_loss:
            return "per_token"
        if self.calculate_per_sample_loss:
            return "per_sample"
        return "default"

    def validate(self) -> None:
        """Stop before any work on a wrong value or a contradiction, naming the flag."""

        def bad(flag: str, why: str) -> None:
            raise ValueError(f"--{flag}: {why}")

        if self.calculate_per_sample_loss and self.calculate_per_token_loss:
            bad("calculate-per-token-loss", "cannot be combined with --calculate-per-sample-loss (pick one loss mode)")
        for name in ("micro_batch_size", "seq_length", "train_iters", "log_interval"):
            if getattr(self, name) < 1:
                bad(name.replace("_", "-"), f"must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            bad("global-batch-size", f"must be >= 1, got {self.global_batch_size}")
        if self.save_interval is not None and self.save_interval < 1:
            bad("save-interval", f"must be >= 1, got {self.save_interval}")
        if self.lr < 0 or self.min_lr < 0:
            bad("lr" if self.lr < 0 else "min-lr", "must be >= 0")
        if self.min_lr > self.lr:
            bad("min-lr", f"{self.min_lr} is above --lr {self.lr}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            bad("lr-decay-style", f"{self.lr_decay_style!r} is not one of {', '.join(LR_DECAY_STYLES)}")
        if self.lr_warmup_fraction is not None and not 0.0 <= self.lr_warmup_fraction <= 1.0:
            bad("lr-warmup-fraction", f"must be in [0, 1], got {self.lr_warmup_fraction}")
        if self.lr_warmup_iters < 0:
            bad("lr-warmup-iters", "must be >= 0")
        if not 0.0 <= self.adam_beta1 < 1.0 or not 0.0 <= self.adam_beta2 < 1.0:
            bad("adam-beta1" if not 0.0 <= self.adam_beta1 < 1.0 else "adam-beta2", "must be in [0, 1)")
        if self.adam_eps <= 0:
            bad("adam-eps", "must be > 0")
        if self.weight_decay < 0:
            bad("weight-decay", "must be >= 0")
        if self.clip_grad < 0:
            bad("clip-grad", "must be >= 0 (0 disables clipping)")
        if self.gc_interval < 0:
            bad("gc-interval", f"must be >= 0 (0: automatic collection), got {self.gc_interval}")
        if self.nan_policy not in NAN_POLICIES:
            bad("nan-policy", f"{self.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}")
        if self.tensor_model_parallel_size != 1:
            bad("tensor-model-parallel-size", "only 1 is supported (tensor parallel is not implemented)")
        if self.context_parallel_size != 1:
            bad("context-parallel-size", "only 1 is supported (context parallel is not implemented)")
        if self.pipeline_model_parallel_size < 1:
            bad("pipeline-model-parallel-size", "must be >= 1")


# Structural flags: model.json owns the structure; these are compared with it and ignored where they disagree.
STRUCTURAL_FLAGS = {
    "num_layers": ("text_decoder", "num_layers", int),
    "hidden_size": ("text_decoder", "hidden_size", int),
    "ffn_hidden_size": ("text_decoder", "ffn_hidden_size", int),
    "num_attention_heads": ("text_decoder", "num_attention_heads", int),
    "num_query_groups": ("text_decoder", "num_query_groups", int),
    "vocab_size": ("text_decoder", "vocab_size", int),
    "max_position_embeddings": ("text_decoder", "max_position_embeddings", int),
    "rotary_base": ("text_decoder", "rope_theta", float),
    "normalization": ("text_decoder", "normalization", str),
    "position_embedding_type": ("text_decoder", "position_embedding_type", str),
}
STRUCTURAL_SWITCHES = {
    "swiglu": "the MLP is SwiGLU (gated_linear_unit in model.json)",
    "group_query_attention": "grouped-query attention follows num_query_groups in model.json",
    "untie_embeddings_and_output_weights": "the Thinker's LM head is untied",
    "disable_bias_linear": "the bias layout follows the Qwen2.5-Omni architecture",
    "add_qkv_bias": "q/k/v have biases in the Qwen2.5-Omni architecture",
}

# Accepted for compatibility with the guide's script; they change nothing here, and the log says why.
NO_EFFECT_FLAGS = {
    "use_mcore_models": "the model is omni_fast's own MindSpore implementation",
    "tokenizer_type": "the tokenizer comes from model_name_or_path in data.json",
    "make_vocab_size_divisible_by": "the vocabulary size comes from the model config",
    "use_fused_swiglu": "SwiGLU runs as composed MindSpore ops",
    "no_masked_softmax_fusion": "attention never uses a masked-softmax fusion",
    "no_gradient_accumulation_fusion": "gradient accumulation adds gradients in fp32",
    "variable_seq_lengths": "batches are always padded per batch (to a multiple of 8)",
    "distributed_timeout_minutes": "MS_NODE_TIMEOUT / HCCL_CONNECT_TIMEOUT govern timeouts under msrun",
    "distributed_backend": "MindSpore picks the backend (HCCL on Ascend, MCCL on CPU)",
    "ai_framework": "omni_fast always runs on MindSpore",
    "ckpt_format": "checkpoints are safetensors",
    "mm_tool": "tools.json has no effect on training",
    "eval_interval": "evaluation is not implemented",
    "eval_iters": "evaluation is not implemented",
}


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m omni_fast.train",
        description="Fine-tune the Qwen2.5-Omni Thinker with MindSpore. With no arguments: a tiny Thinker on the "
        "generated demo data.",
    )
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata["help"] + (f" (default: {f.default})" if f.default not in (None, False) else "")
        if f.type in ("bool", bool):
            if f.name == "jit":
                parser.add_argument("--no-jit", dest="jit", action="store_false", help="run PyNative (debugging)")
            else:
                parser.add_argument(_dash(f.name), dest=f.name, action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        choices = {"lr_decay_style": LR_DECAY_STYLES, "nan_policy": NAN_POLICIES}.get(f.name)
        parser.add_argument(_dash(f.name), dest=f.name, type=kind, default=None, choices=choices, help=help_text)
    structure = parser.add_argument_group("model structure (model.json owns these; a disagreeing value is ignored)")
    for name, (_, key, kind) in STRUCTURAL_FLAGS.items():
        structure.add_argument(_dash(name), dest=f"structure_{name}", type=kind, help=f"compared with {key}")
    for name, why in STRUCTURAL_SWITCHES.items():
        structure.add_argument(_dash(name), dest=f"structure_{name}", action="store_true", help=why)
    compat = parser.add_argument_group("accepted for compatibility, no effect")
    for name, why in NO_EFFECT_FLAGS.items():
        compat.add_argument(_dash(name), dest=f"noeffect_{name}", nargs="?", const=True, help=why)
    return parser


@dataclass
class ParsedArgs:
    config: TrainConfig
    structural: dict[str, Any]  # flag name -> value given on the command line
    no_effect: dict[str, str]  # flag name -> why it has no effect


def parse_args(argv: list[str]) -> ParsedArgs:
    namespace = vars(build_parser().parse_args(argv))
    given = {f.name: namespace[f.name] for f in dataclasses.fields(TrainConfig) if namespace.get(f.name) is not None}
    # store_true flags come back False when absent; keep the dataclass default then.
    given = {k: v for k, v in given.items() if not (v is False and k != "jit")}
    config = TrainConfig(**given)
    config.validate()
    structural = {
        k.removeprefix("structure_"): v
        for k, v in namespace.items()
        if k.startswith("structure_") and v not in (None, False)
    }
    no_effect = {
        k.removeprefix("noeffect_"): NO_EFFECT_FLAGS[k.removeprefix("noeffect_")]
        for k, v in namespace.items()
        if k.startswith("noeffect_") and v is not None
    }
    return ParsedArgs(config, structural, no_effect)
