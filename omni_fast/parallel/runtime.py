"""The processes of a run: msrun's cluster, the data-parallel and pipeline groups, collectives, point-to-point.

Rank layout (Megatron's order with tensor parallel 1): ``rank = pp_rank * dp_size + dp_rank``. Stage ``p`` is ranks
``[p * dp_size, (p + 1) * dp_size)`` (its data-parallel group), and the ranks ``d, d + dp_size, ...`` form one
pipeline. With ``--pipeline-model-parallel-size 2`` on 8 devices: stage 0 = ranks 0-3, stage 1 = ranks 4-7.

Only MindSpore's own runtime is used: ``msrun`` launches the processes, ``mindspore.communication.init()`` joins them
(HCCL on Ascend, MCCL over TCP on CPU), ``ops.AllReduce`` / ``mint.distributed`` carry the data. What each collective
does on CPU is in docs/reference/mindspore_cpu.md section 3 (no ReduceScatter, no Send/Receive primitives;
``mint.distributed`` send/recv need the patch in :func:`patch_send_recv`; AllReduce on CPU takes float32/float16
only, so exact scalars and counts go through ``all_gather_object``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, mint, ops

from omni_fast.ops import dispatch
from omni_fast.parallel.layout import PipelineLayout

logger = logging.getLogger("omni_fast.parallel")

# Forward transfers start with a shape header: [count, then per tensor ndim and MAX_NDIM dims].
MAX_CARRIES = 4
MAX_NDIM = 3
HEADER_SIZE = 1 + MAX_CARRIES * (1 + MAX_NDIM)


def launched_by_msrun() -> bool:
    """msrun sets MS_ROLE in every process it starts (the scheduler and the workers)."""
    return os.environ.get("MS_ROLE") in ("MS_SCHED", "MS_WORKER")


def launched_world_size() -> int:
    """The number of workers msrun launched (``--worker_num``), known before communication starts; 1 otherwise."""
    return int(os.environ.get("MS_WORKER_NUM", "1")) if launched_by_msrun() else 1


def patch_send_recv() -> None:
    """Make ``mint.distributed.send/recv/isend/irecv`` work on CPU (MindSpore 2.7.2 and 2.10).

    ``mint.distributed.distributed.get_cache_group_rank/size`` bind their default ``group`` at import time, when
    ``GlobalComm.WORLD_COMM_GROUP`` is still ``"hccl_world_group"``; ``send`` calls them without a group, so on CPU
    (world group ``"mccl_world_group"``) it fails with "group hccl_world_group does not exist" and the receiver
    hangs. Re-binding the defaults after ``init()`` fixes it (docs/reference/mindspore_cpu.md section 3.1, verified
    there and by tests/test_parallel.py). On Ascend the world group is already ``hccl_world_group``: a no-op.
    """
    import mindspore.mint.distributed.distributed as dist
    from mindspore.communication import GlobalComm

    dist.get_cache_group_rank.__defaults__ = (GlobalComm.WORLD_COMM_GROUP,)
    dist.get_cache_group_size.__defaults__ = (GlobalComm.WORLD_COMM_GROUP,)


@dataclass
class ParallelContext:
    """This process's place in the run. Groups are None where they have one member (nothing to communicate)."""

    rank: int
    world_size: int
    layout: PipelineLayout
    dp_group: str | None = None
    pp_group: str | None = None
    world_group: str | None = None
    _reducers: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def pp_size(self) -> int:
        return self.layout.size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.pp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp_size

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp_size

    def global_rank(self, pp_rank: int, dp_rank: int) -> int:
        return pp_rank * self.dp_size + dp_rank

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, tensor: Tensor, group: str | None) -> Tensor:
        """Sum over ``group`` (identity for a one-member group)."""
        if group is None:
            return tensor
        if group not in self._reducers:
            self._reducers[group] = ops.AllReduce(ops.ReduceOp.SUM, group)
        return self._reducers[group](tensor)

    def gather_objects(self, value: Any, group: str | None) -> list[Any]:
        """Every member's ``value``, in group-rank order (exact: pickled, not reduced in float32)."""
        if group is None:
            return [value]
        from mindspore.communication import get_group_size

        values: list[Any] = [None] * get_group_size(group)
        mint.distributed.all_gather_object(values, value, group=group)
        return values

    def broadcast(self, tensor: Tensor, src_rank: int, group: str | None) -> None:
        """In place, from global rank ``src_rank``."""
        if group is not None:
            mint.distributed.broadcast(tensor, src_rank, group=group)

    def barrier(self) -> None:
        if self.world_group is not None:
            mint.distributed.barrier(group=self.world_group)


def single_process_context(layout: PipelineLayout) -> ParallelContext:
    return ParallelContext(rank=0, world_size=1, layout=layout)


def join_cluster(layout: PipelineLayout) -> ParallelContext:
    """Under msrun: pick the device, ``init()`` the communication, create the groups. Never returns in msrun's
    scheduler process (its ``init()`` serves the cluster and exits)."""
    from mindspore.communication import GlobalComm, create_group, get_group_size, get_rank, init

    device = "Ascend" if dispatch.ascend_available() else "CPU"
    ms.set_context(device_target=device)
    init()
    patch_send_recv()
    rank, world = get_rank(), get_group_size()  # validate() checked that layout.size divides world
    dp_size, pp_size = world // layout.size, layout.size
    pp_rank, dp_rank = divmod(rank, dp_size)
    world_group = GlobalComm.WORLD_COMM_GROUP

    def group(name: str, ranks: list[int]) -> str | None:
        if len(ranks) == 1:
            return None
        if len(ranks) == world:
            return world_group
        create_group(name, ranks)
        return name

    ctx = ParallelContext(
        rank=rank,
        world_size=world,
        layout=layout,
        dp_group=group(f"omni_fast_dp_stage{pp_rank}", [pp_rank * dp_size + d for d in range(dp_size)]),
        pp_group=group(f"omni_fast_pp_replica{dp_rank}", [p * dp_size + dp_rank for p in range(pp_size)]),
        world_group=world_group,
    )
    if rank != 0:
        # Only rank 0 logs progress; other ranks still report warnings and errors in their msrun worker log.
        logging.getLogger("omni_fast").setLevel(logging.WARNING)
    logger.info(
        "msrun: %d workers (%s), device target %s (%s), pipeline %d x data parallel %d; this is rank %d",
        world, GlobalComm.BACKEND, device, "an Ascend NPU is available" if device == "Ascend" else "no Ascend NPU",
        pp_size, dp_size, rank,
    )
    return ctx


class PointToPoint:
    """Activations and gradients between neighbouring pipeline stages (``mint.distributed`` isend/recv).

    Sends are asynchronous (``isend``) and their handles and tensors are kept until :meth:`wait`, so a stage never
    blocks on a send: the 1F1B order then cannot deadlock whether the transport buffers (MCCL over TCP does) or
    rendezvous. Messages between two ranks must arrive in the order sent: true for MCCL here (probed with 80
    messages of mixed sizes; the pipeline runs of tests/test_parallel.py depend on it).
    """

    def __init__(self, dtype: ms.dtype):
        self.dtype = dtype
        self._pending: list[tuple[Any, Tensor]] = []

    def _send(self, tensor: Tensor, dst: int) -> None:
        self._pending.append((mint.distributed.isend(tensor, dst), tensor))

    def send(self, values: Sequence[Tensor], dst: int, *, header: bool) -> None:
        """``values`` flattened into one message (after a shape header when ``header``)."""
        if header:
            if len(values) > MAX_CARRIES or any(v.ndim > MAX_NDIM for v in values):
                raise ValueError(f"cannot describe {[tuple(v.shape) for v in values]} in a pipeline header")
            head = np.zeros(HEADER_SIZE, np.int64)
            head[0] = len(values)
            for i, v in enumerate(values):
                base = 1 + i * (1 + MAX_NDIM)
                head[base] = v.ndim
                head[base + 1 : base + 1 + v.ndim] = v.shape
            self._send(Tensor(head), dst)
        if values:
            self._send(ops.cat([v.astype(self.dtype).reshape(-1) for v in values]), dst)

    def recv(self, src: int, shapes: Sequence[tuple[int, ...]] | None = None) -> list[Tensor]:
        """The tensors of one :meth:`send`; ``shapes`` None reads them from the header."""
        if shapes is None:
            head = Tensor(np.zeros(HEADER_SIZE, np.int64))
            mint.distributed.recv(head, src)
            head = head.asnumpy()
            shapes = []
            for i in range(int(head[0])):
                base = 1 + i * (1 + MAX_NDIM)
                shapes.append(tuple(int(d) for d in head[base + 1 : base + 1 + int(head[base])]))
        if not shapes:
            return []
        sizes = [int(np.prod(s)) for s in shapes]
        flat = ops.zeros((sum(sizes),), self.dtype)
        mint.distributed.recv(flat, src)
        out, start = [], 0
        for shape, size in zip(shapes, sizes):
            out.append(flat[start : start + size].reshape(shape))
            start += size
        return out

    def wait(self) -> None:
        for handle, _ in self._pending:
            handle.wait()
        self._pending.clear()
