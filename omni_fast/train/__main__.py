"""``python -m omni_fast.train``: with no arguments, the smoke run (see ``omni_fast.train.smoke``)."""

import sys

from omni_fast.train.smoke import run

if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit("omni_fast.train takes no arguments yet: the full trainer lands with issue #6")
    losses = run()
    sys.exit(0 if losses[-1] < losses[0] else 1)
