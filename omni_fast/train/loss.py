"""The three loss modes of MindSpeed-MM as per-token weights.

Every mode is ``sum(nll * w)`` over the shifted labels of one micro-batch with host-computed weights ``w``, and the
optimizer step uses the plain sum of the micro-batches' gradients (and, across data-parallel ranks, their sum):

* default: token mean within the micro-batch, then the mean over accumulation steps and data-parallel ranks;
* per_sample (``--calculate-per-sample-loss``): each sample's token mean, then the mean over samples, steps, ranks;
* per_token (``--calculate-per-token-loss``): the sum over the global batch divided by its valid-token count.

The reported loss is the sum of the weighted micro-batch losses, the number the reference logs.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def valid_targets(labels: np.ndarray) -> np.ndarray:
    """[B, S-1] bool: shifted labels that count."""
    return labels[:, 1:] != IGNORE_INDEX


def loss_weights(
    micro_batch_labels: list[np.ndarray], mode: str, *, dp_size: int = 1, global_valid: int | None = None
) -> list[np.ndarray]:
    """Weights [B, S-1] (float32) for each micro-batch of one rank's optimizer step.

    ``global_valid`` is the valid-token count over the whole global batch (all ranks); needed for per_token and
    computed from ``micro_batch_labels`` when there is one rank.
    """
    steps = len(micro_batch_labels)
    valids = [valid_targets(labels).astype(np.float64) for labels in micro_batch_labels]
    if mode == "default":
        weights = [v / max(v.sum(), 1.0) / steps / dp_size for v in valids]
    elif mode == "per_sample":
        weights = [v / np.maximum(v.sum(-1, keepdims=True), 1.0) / v.shape[0] / steps / dp_size for v in valids]
    elif mode == "per_token":
        total = global_valid if global_valid is not None else int(sum(v.sum() for v in valids))
        weights = [v / max(total, 1) for v in valids]
    else:
        raise ValueError(f"unknown loss mode {mode!r}")
    return [w.astype(np.float32) for w in weights]
