"""Make every copy of a module equal to its source's at setup, as DDP does.

The encoder and generator are replicated on every rank of the ``pp x dp`` grid and each LLM stage
on every rank of its data-parallel group. Gradients are summed over those groups, which keeps the
copies equal only if they start equal; ranks that built the model differently (another seed,
meta-device initialisation, another build order) would otherwise train different copies
silently. One broadcast per bucket at setup rules that out. Parameters tied between the
embedding and the head have a copy on the first and on the last stage's rank, and the last
stage's copy is overwritten with stage 0's, as the one-process model has one tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import collectives
from .executor import PipelineExecutor
from .grad_sync import DEFAULT_BUCKET_BYTES, buckets, tied_parameters
from .watch import PeerWatch

__all__ = ["broadcast_tensors", "equalise_replicas"]


@torch.no_grad()
def broadcast_tensors(
    tensors: Sequence[torch.Tensor],
    src: int,
    group: dist.ProcessGroup,
    watch: PeerWatch,
    what: str,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """Overwrite ``tensors`` with global rank ``src``'s, over ``group``, one broadcast per bucket
    (``what`` names it if a peer is lost).

    Every rank of ``group`` must pass tensors of the same shapes in the same order (e.g. a module's
    parameters and buffers, :func:`_held`).
    """
    for run in buckets([t for t in tensors if t.numel()], bucket_bytes):
        flat = torch.cat([t.detach().reshape(-1) for t in run])
        collectives.broadcast(flat, src, group, watch, what)
        offset = 0
        for t in run:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def equalise_replicas(executor: PipelineExecutor) -> None:
    """The executor's encoder/generator replicas from global rank 0 over every rank, each of its
    stages from data-parallel rank 0 of its group, then the tied embedding parameters from each
    pipeline's first rank to its last. A collective over the world."""
    groups, watch = executor.groups, executor.watch
    if groups.pp * groups.dp == 1:
        return
    for module in (executor.parts.encoder, executor.parts.generator):
        if module is not None:
            broadcast_tensors(_held(module), 0, groups.replica_group, watch, "the replica broadcast at setup")
    if groups.dp > 1:
        for stage in executor.stages:
            what = "the stage broadcast at setup"
            broadcast_tensors(_held(stage), groups.dp_ranks[0], groups.dp_group, watch, what)
    if groups.ends_group is not None and executor.parts.tied:
        what = "the tied embedding broadcast at setup"
        tied = tied_parameters(executor.parts)
        broadcast_tensors(tied, groups.pipeline_ranks[0], groups.ends_group, watch, what)


def _held(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s parameters and buffers, in a fixed order."""
    return [*module.parameters(), *module.buffers()]
