"""The two optimizers a parallel run adds to ``omni_fast.train.optim.AdamW``.

* :class:`DummyOptimizer` (``--enable-dummy-optimizer``): for a pipeline stage whose parameters are all frozen.
  MindSpeed-MM injects an empty placeholder parameter so Megatron's optimizer has something to hold; here the stage
  simply gets an optimizer with no parameters and no state that counts steps (so checkpoints and the learning-rate
  bookkeeping stay uniform across stages).
* :class:`DistributedOptimizer` (``--use-distributed-optimizer``): ZeRO-1 by parameter ownership. Each parameter is
  owned by one data-parallel rank (greedy by size, largest first, onto the least-loaded rank); a rank keeps AdamW
  state (Adam moments, fp32 master weights) only for the parameters it owns, so optimizer memory drops by about the
  data-parallel size. Gradients arrive all-reduced (on CPU there is no ReduceScatter; with parameter ownership the
  all-reduce is what every rank needs for the global gradient norm anyway); each rank updates its own parameters with
  the unchanged AdamW and then every parameter is broadcast from its owner. The arithmetic is AdamW's, element for
  element, so the weights equal the unsharded run's.
"""

from __future__ import annotations

from collections.abc import Callable

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor

from omni_fast.parallel.runtime import ParallelContext


class DummyOptimizer:
    """No parameters, no state: ``update`` does nothing; the step count is kept for checkpoints."""

    def __init__(self) -> None:
        self.step_count = 0

    def host_scalars(self, lr: float) -> tuple[Tensor, Tensor, Tensor]:
        self.step_count += 1
        return tuple(Tensor(np.float32(0.0)) for _ in range(3))

    def __call__(self, grads: tuple, grad_scale: Tensor, lr_wd: Tensor, step_size: Tensor, bc2_sqrt: Tensor) -> bool:
        return True

    def state(self) -> dict[str, np.ndarray]:
        return {"step": np.array(self.step_count, np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.step_count = int(np.asarray(state["step"]).reshape(-1)[0])


def assign_owners(sizes: list[int], ranks: int) -> list[int]:
    """Owner rank of each parameter: largest first onto the least-loaded rank (ties: lower index, lower rank)."""
    load = [0] * ranks
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += sizes[i]
    return owners


class DistributedOptimizer:
    """AdamW state sharded across the data-parallel group by parameter ownership (see the module docstring).

    ``make_adamw(params)`` builds the inner optimizer for the owned parameters (the trainer's AdamW with its flags);
    ``compile_`` wraps its update (``ms.jit`` or identity).
    """

    def __init__(
        self,
        params: list[Parameter],
        ctx: ParallelContext,
        make_adamw: Callable[[list[Parameter]], object],
        compile_: Callable,
    ):
        self.params = params
        self.ctx = ctx
        self.owners = assign_owners([int(np.prod(p.shape)) for p in params], ctx.dp_size)
        self.owned = [i for i, owner in enumerate(self.owners) if owner == ctx.dp_rank]
        owned_params = [params[i] for i in self.owned]
        self.inner = make_adamw(owned_params) if owned_params else DummyOptimizer()
        inner = self.inner

        def update(grads, grad_scale, lr_wd, step_size, bc2_sqrt):
            return inner(grads, grad_scale, lr_wd, step_size, bc2_sqrt)

        self._update = compile_(update) if owned_params else update

    @property
    def step_count(self) -> int:
        return self.inner.step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.inner.step_count = value

    def host_scalars(self, lr: float) -> tuple[Tensor, Tensor, Tensor]:
        return self.inner.host_scalars(lr)

    def __call__(self, grads: tuple, grad_scale: Tensor, lr_wd: Tensor, step_size: Tensor, bc2_sqrt: Tensor) -> bool:
        self._update(ms.mutable(tuple(grads[i] for i in self.owned)), grad_scale, lr_wd, step_size, bc2_sqrt)
        for param, owner in zip(self.params, self.owners):
            self.ctx.broadcast(param, self.ctx.global_rank(self.ctx.pp_rank, owner), self.ctx.dp_group)
        return True

    def state(self) -> dict[str, np.ndarray]:
        """This rank's shard: the AdamW state of the parameters it owns (names as the unsharded AdamW's)."""
        return self.inner.state()

    def load_state(self, state) -> None:
        """From any mapping holding at least this rank's names (an unsharded state, or every shard merged)."""
        self.inner.load_state(state)
