"""The collectives of the runtime and the strategy, bounded by the timeout and named when they fail.

A plain ``dist.all_reduce`` waits as long as its group's timeout and fails with the backend's
error, which names an address (gloo) or nothing (NCCL, whose watchdog aborts the process). These
post the operation asynchronously, wait for it until the :class:`~.watch.PeerWatch`'s deadline
and turn a timeout or a broken connection into a
:class:`~lightning_bigmac.runtime.errors.PeerError` naming the op, its group, the step and the
rank that failed first.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .groups import PipelineGroups
from .watch import Lost, PeerWatch, finish

__all__ = [
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_object",
    "gather_object",
    "recv_tensor",
    "send_tensor",
    "sever_all",
]


def _run(
    post: Callable[[], dist.Work],
    group: dist.ProcessGroup | None,
    watch: PeerWatch,
    what: str,
    peer: int | None = None,
) -> None:
    """Post a collective over ``group`` (None: the world), or a send or receive with global rank
    ``peer`` of it, and wait for it, bounded; ``what`` names it in errors."""
    group = dist.group.WORLD if group is None else group
    ranks = dist.get_process_group_ranks(group) if peer is None else [watch.rank, peer]
    peers = tuple(r for r in ranks if r != watch.rank)
    label = f"{what} over ranks {ranks}" if peer is None else f"{what} with rank {peer}"
    deadline = watch.deadline()
    watch.blocked(peers, label)
    try:
        finish(post(), deadline, dist.get_backend(group) == "gloo")
    except TimeoutError:
        raise watch.failure(Lost(peers, f"{label} did not complete within {watch.timeout:g}s")) from None
    except RuntimeError as err:
        raise watch.failure(Lost(peers, f"lost a peer in {label}", err)) from err
    finally:
        watch.unblocked()


def all_reduce(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None,
    watch: PeerWatch,
    what: str,
    op: dist.ReduceOp.RedOpType | str | None = "sum",
) -> torch.Tensor:
    """Reduce ``tensor`` in place over ``group`` and return it.

    ``op``: a ``ReduceOp`` or its name (None: sum); ``"mean"``/``"avg"`` sums and divides by the
    group's size (gloo has no AVG), as Lightning's ``reduce`` does.
    """
    op = "sum" if op is None else op
    mean = isinstance(op, str) and op.lower() in ("mean", "avg")
    red = dist.ReduceOp.SUM if mean else getattr(dist.ReduceOp, op.upper()) if isinstance(op, str) else op
    _run(lambda: dist.all_reduce(tensor, op=red, group=group, async_op=True), group, watch, what)
    if mean:
        size = dist.get_world_size(group)
        return tensor.div_(size) if torch.is_floating_point(tensor) else tensor.copy_(tensor / size)
    return tensor


def barrier(group: dist.ProcessGroup | None, watch: PeerWatch, what: str) -> None:
    """Wait until every rank of ``group`` got here."""
    _run(lambda: dist.barrier(group=group, async_op=True), group, watch, what)


def broadcast(
    tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None, watch: PeerWatch, what: str
) -> None:
    """Overwrite ``tensor`` with global rank ``src``'s, on every rank of ``group``."""
    _run(lambda: dist.broadcast(tensor, src, group=group, async_op=True), group, watch, what)


def broadcast_object(
    obj: Any, src: int, group: dist.ProcessGroup | None, watch: PeerWatch, what: str, device: torch.device
) -> Any:
    """Global rank ``src``'s ``obj`` on every rank of ``group`` (pickled; two bounded broadcasts:
    the size, then the bytes, on ``device``, which NCCL needs to be the rank's GPU)."""
    mine = dist.get_rank() == src
    data = pickle.dumps(obj) if mine else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    _run(lambda: dist.broadcast(size, src, group=group, async_op=True), group, watch, what)
    if mine:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    _run(lambda: dist.broadcast(buf, src, group=group, async_op=True), group, watch, what)
    return obj if mine else pickle.loads(buf.cpu().numpy().tobytes())


def gather_object(
    obj: Any, dst: int, group: dist.ProcessGroup | None, watch: PeerWatch, what: str, device: torch.device
) -> list[Any] | None:
    """Every rank's ``obj`` of ``group``, in group order, on global rank ``dst`` (None elsewhere):
    pickled, padded to the longest and gathered, each step bounded and named like the others."""
    data = pickle.dumps(obj)
    n = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(n)]
    _run(lambda: dist.all_gather(sizes, size, group=group, async_op=True), group, watch, what)
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = dist.get_rank() == dst
    bufs = [torch.empty_like(buf) for _ in range(n)] if mine else None
    _run(lambda: dist.gather(buf, bufs, dst=dst, group=group, async_op=True), group, watch, what)
    if bufs is None:
        return None
    return [
        pickle.loads(b[: int(s.item())].cpu().numpy().tobytes()) for b, s in zip(bufs, sizes, strict=True)
    ]


def send_tensor(
    tensor: torch.Tensor, peer: int, group: dist.ProcessGroup, watch: PeerWatch, what: str
) -> None:
    """Send ``tensor`` to global rank ``peer`` of ``group`` (bounded and named, as the collectives)."""
    _run(lambda: dist.isend(tensor, peer, group=group), group, watch, what, peer)


def recv_tensor(
    tensor: torch.Tensor, peer: int, group: dist.ProcessGroup, watch: PeerWatch, what: str
) -> None:
    """Receive into ``tensor`` from global rank ``peer`` of ``group`` (bounded and named)."""
    _run(lambda: dist.irecv(tensor, peer, group=group), group, watch, what, peer)


def sever_all(groups: PipelineGroups) -> None:
    """Close this rank's connections in every group of ``groups`` (a rank that failed does it):
    every operation posted on them here fails, and every peer waiting on this rank fails at once.

    Gloo cannot cancel a posted operation, but a receive that times out closes its group's
    connections: one that waits 1 ms does it. NCCL groups are left to their peers' timeouts.
    """
    me = dist.get_rank()
    every = (*groups.channels.values(), groups.pipeline_group, groups.dp_group, groups.replica_group)
    for group in {id(g): g for g in (*every, groups.ends_group) if g is not None}.values():
        peers = [r for r in dist.get_process_group_ranks(group) if r != me]
        if peers and dist.get_backend(group) == "gloo":
            with contextlib.suppress(RuntimeError):  # a broken connection refuses the receive at once
                probe = dist.irecv(torch.empty(1), src=peers[0], group=group, tag=2**31 - 1)
                probe.wait(datetime.timedelta(milliseconds=1))
