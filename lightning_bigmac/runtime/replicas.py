"""Make every copy of a module equal to its source's at setup, as DDP does.

The encoder and generator are replicated on every rank of the ``pp x dp`` grid and each LLM stage
on every rank of its data-parallel group. Gradients are summed over those groups, which keeps the
copies equal only if they start equal; ranks that built the model differently (another seed,
meta-device initialisation, another build order) would otherwise train different copies
silently. One broadcast per bucket at setup rules that out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .grad_sync import DEFAULT_BUCKET_BYTES, buckets
from .groups import PipelineGroups

__all__ = ["broadcast_module", "equalise_replicas"]


@torch.no_grad()
def broadcast_module(
    module: nn.Module, src: int, group: dist.ProcessGroup, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> None:
    """Overwrite ``module``'s parameters and buffers with global rank ``src``'s, over ``group``.

    Every rank of ``group`` must pass a module of the same structure (same tensors, same order).
    """
    tensors: Sequence[torch.Tensor] = [*module.parameters(), *module.buffers()]
    for run in buckets([t for t in tensors if t.numel()], bucket_bytes):
        flat = torch.cat([t.detach().reshape(-1) for t in run])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for t in run:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def equalise_replicas(
    replicated: Sequence[nn.Module], stages: Sequence[nn.Module], groups: PipelineGroups
) -> None:
    """Encoder/generator (``replicated``) from global rank 0 over every rank; each of this rank's
    ``stages`` from data-parallel rank 0 of its group. A collective over the world."""
    if groups.pp * groups.dp == 1:
        return
    for module in replicated:
        broadcast_module(module, src=0, group=groups.replica_group)
    if groups.dp > 1:
        for stage in stages:
            broadcast_module(stage, src=groups.dp_ranks[0], group=groups.dp_group)
