"""Which samples each micro-batch takes: a seeded permutation per epoch, resumable from a consumed-sample count.

Like MindSpeed-MM's ``BaseRandomBatchSampler``: the global batch is cut from one permutation of the dataset per epoch
and spread rank-strided over the data-parallel ranks; resuming from ``consumed_samples`` continues exactly where the
interrupted run stopped. Incomplete global batches at the end of an epoch are dropped (``drop_last``).
"""

from __future__ import annotations

import numpy as np


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch_size: int, *, seed: int, dp_rank: int = 0, dp_size: int = 1):
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch ({global_batch_size}); "
                "lower --global-batch-size or add data"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.batches_per_epoch = num_samples // global_batch_size

    def global_batch(self, consumed_samples: int) -> np.ndarray:
        """Sample indices of the global batch that starts after ``consumed_samples`` (a multiple of its size)."""
        step = consumed_samples // self.global_batch_size
        epoch, offset = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        start = offset * self.global_batch_size
        return order[start : start + self.global_batch_size]

    def rank_micro_batches(self, consumed_samples: int, micro_batch_size: int) -> list[np.ndarray]:
        """This rank's micro-batches of that global batch (rank-strided, then cut into micro-batches)."""
        mine = self.global_batch(consumed_samples)[self.dp_rank :: self.dp_size]
        return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
