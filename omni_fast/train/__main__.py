"""``python -m omni_fast.train [flags]``: fine-tune the Thinker. With no flags: a tiny Thinker on the demo data."""

import logging
import sys

from omni_fast.config.train_config import parse_args
from omni_fast.ops import dispatch
from omni_fast.train.setup import build_trainer
from omni_fast.train.trainer import TrainingStopped


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    dispatch.configure_cpu_runtime()  # before any graph runs
    try:
        parsed = parse_args(
            argv
            if argv
            else [
                "--train-iters",
                "30",
                "--lr",
                "5e-4",
                "--global-batch-size",
                "2",
                "--lr-warmup-iters",
                "3",
                "--save",
                "outputs/omni_fast_demo/run",
                "--save-interval",
                "30",
                "--log-tps",
            ]
        )
        trainer = build_trainer(parsed)
        summary = trainer.train()
    except (ValueError, FileNotFoundError, TrainingStopped) as err:
        logging.getLogger("omni_fast.train").error("%s", err)
        return 2
    if trainer.is_logging_rank:  # one line per run, not per msrun worker
        print(
            f"done: {summary['iterations']} iterations, loss {summary['first_loss']:.4f} -> "
            f"{summary['last_loss']:.4f}, {summary['tokens_per_second']:.0f} tokens/s "
            f"({summary['samples_per_second']:.2f} samples/s) over {summary['steps_timed']} steady steps"
            + (f", MFU {summary['mfu_estimate']:.1%}" if summary["mfu_estimate"] is not None else "")
            + f"; {summary['compile_steps']} steps compiled a new batch shape ({summary['compile_seconds']:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
