"""``mm-convert``: MindSpeed-MM's weight-conversion command line, for Qwen2.5-Omni.

    mm-convert Qwen2_5_OmniConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF \\
        --cfg.parallel_config.llm_pp_layers [[11,17]] --cfg.parallel_config.vit_pp_layers [[32,0]] \\
        --cfg.parallel_config.audio_pp_layers [[32,0]] --cfg.parallel_config.tp_size 1
    mm-convert Qwen2_5_OmniConverter mm_to_hf --cfg.save_hf_dir OUT --cfg.mm_dir MM --cfg.hf_config.hf_dir HF \\
        --cfg.parallel_config.llm_pp_layers [11,17] --cfg.parallel_config.vit_pp_layers [32,0] \\
        --cfg.parallel_config.audio_pp_layers [32,0] --cfg.parallel_config.tp_size 1

The flags keep MindSpeed-MM's names (its jsonargparse ``--cfg.*`` fields); lists are accepted nested or flat in
both verbs. ``--backend`` and ``--threads`` are omni_fast's own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from omni_fast.convert.layout import ParallelLayout
from omni_fast.convert.qwen2_5_omni import hf_to_mm, mm_to_hf

CONVERTER = "Qwen2_5_OmniConverter"

LIST_HELP = ("{tower} layers on each pipeline stage, one count per stage, summing to {depth}; must match "
             "pipeline_num_layers of {section} in model.json. JSON list, nested ([[11,17]], as hf_to_mm's "
             "VppParallelConfig) or flat ([11,17]); one virtual-pipeline chunk only.")


def _add_parallel(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("parallel_config" + ("" if required else " (optional: read from the "
                                                                                 "checkpoint, checked if given)"))
    for name, tower, depth, section in (
        ("llm", "Text decoder", "thinker_config.text_config.num_hidden_layers (28 for 7B)", "text_decoder"),
        ("vit", "Vision tower", "thinker_config.vision_config.depth (32)", "image_encoder.vision_encoder"),
        ("audio", "Audio tower", "thinker_config.audio_config.encoder_layers (32)", "audio_encoder.audio_encoder"),
    ):
        group.add_argument(f"--cfg.parallel_config.{name}_pp_layers", dest=f"{name}_pp_layers", required=required,
                           metavar="LIST", help=LIST_HELP.format(tower=tower, depth=depth, section=section))
    group.add_argument("--cfg.parallel_config.tp_size", dest="tp_size", metavar="N", default=None,
                       help="Tensor-parallel size (default 1); must equal the training script's TP and divide the "
                            "key-value heads (4 for 7B), the attention heads of all three towers, the vocabulary and "
                            "the MLP widths.")


def _add_engine(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("omni_fast engine")
    group.add_argument("--backend", choices=("compiled", "numpy"), default="compiled",
                       help="compiled: multi-threaded C++ copy from memory-mapped files (default); numpy: the plain "
                            "numpy reference implementation (same output bytes, slower, holds the model in memory).")
    group.add_argument("--threads", type=int, default=0, metavar="N",
                       help="Threads for the compiled backend (default 0: all OpenMP threads).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm-convert", description="Convert Qwen2.5-Omni weights between the Hugging "
                                     "Face layout and MindSpeed-MM's (Megatron) layout, split for pipeline and tensor "
                                     "parallel training.")
    converters = parser.add_subparsers(dest="converter", required=True, metavar="CONVERTER")
    omni = converters.add_parser(CONVERTER, help="Qwen2.5-Omni (the thinker is converted; talker and token2wav "
                                 "stay in the Hugging Face directory)")
    verbs = omni.add_subparsers(dest="verb", required=True, metavar="VERB")

    to_mm = verbs.add_parser("hf_to_mm", help="Hugging Face directory -> MM checkpoint (release)",
                             description="Write MM_DIR/release/mp_rank_TT[_PPP]/model.safetensors and "
                             "MM_DIR/latest_checkpointed_iteration.txt (= release).")
    to_mm.add_argument("--cfg.mm_dir", dest="mm_dir", required=True, metavar="DIR",
                       help="Output MM checkpoint directory; must not exist or be empty.")
    to_mm.add_argument("--cfg.hf_config.hf_dir", dest="hf_dir", required=True, metavar="DIR",
                       help="Hugging Face Qwen2.5-Omni directory (config.json and *.safetensors).")
    _add_parallel(to_mm, required=True)
    _add_engine(to_mm)

    to_hf = verbs.add_parser("mm_to_hf", help="MM checkpoint (release or a trained iteration) -> Hugging Face "
                             "directory", description="Read the iteration named by MM_DIR/"
                             "latest_checkpointed_iteration.txt, merge it with the original Hugging Face directory "
                             "(talker, token2wav and all non-weight files kept) and write it sharded like the "
                             "original.")
    to_hf.add_argument("--cfg.save_hf_dir", dest="save_hf_dir", required=True, metavar="DIR",
                       help="Output Hugging Face directory; must not exist or be empty.")
    to_hf.add_argument("--cfg.mm_dir", dest="mm_dir", required=True, metavar="DIR",
                       help="MM checkpoint directory (holding latest_checkpointed_iteration.txt), e.g. the trainer's "
                            "--save directory.")
    to_hf.add_argument("--cfg.hf_config.hf_dir", dest="hf_dir", required=True, metavar="DIR",
                       help="The original Hugging Face directory the checkpoint came from.")
    _add_parallel(to_hf, required=False)
    _add_engine(to_hf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        layers = (args.llm_pp_layers, args.vit_pp_layers, args.audio_pp_layers)
        given = any(v is not None for v in layers) or args.tp_size is not None
        if given and any(v is None for v in layers):
            raise ValueError("give all of --cfg.parallel_config.{llm,vit,audio}_pp_layers, or none of them")
        layout = ParallelLayout.parse(*layers, 1 if args.tp_size is None else args.tp_size) if given else None
        if args.verb == "hf_to_mm":
            report = hf_to_mm(args.hf_dir, args.mm_dir, layout, backend=args.backend, threads=args.threads)
        else:
            report = mm_to_hf(args.mm_dir, args.hf_dir, args.save_hf_dir, layout, backend=args.backend,
                              threads=args.threads)
    except (ValueError, OSError) as err:
        print(f"mm-convert: error: {err}", file=sys.stderr)
        return 1
    print(f"mm-convert {args.verb}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
