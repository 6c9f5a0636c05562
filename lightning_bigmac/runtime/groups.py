"""Process groups for ``pp x dp`` ranks: which ranks form a pipeline, which a data-parallel group.

Rank layout (global rank ``g``, pipeline rank ``p``, data-parallel rank ``d``)::

    g = d * pp + p        pipeline d      = global ranks d*pp .. d*pp + pp - 1   (contiguous)
                          data-parallel p = global ranks p, pp + p, 2*pp + p, ... (strided)

e.g. pp=2, dp=2: pipelines {0, 1} and {2, 3}; data-parallel groups {0, 2} and {1, 3}. Pipeline
ranks are contiguous so that on a multi-GPU node the chatty point-to-point traffic stays on
neighbouring devices; data-parallel traffic happens once per step.

With ``pp > 1`` the first and the last rank of each pipeline also form an *ends* group: both hold
the parameters tied between the embedding (stage 0) and the head (the last stage), whose
gradients are summed over it (for ``pp == 2`` it is the pipeline group itself).

Besides the pipeline and data-parallel groups every rank gets one *directed channel* per ordered
pair of ranks of its pipeline: a two-rank group used only for messages from ``a`` to ``b``. NCCL
runs all operations of one communicator on one stream, so a send ``a -> b`` and a send
``b -> a`` on a shared communicator could each wait for the other's receive; one communicator per
direction removes that cycle. Gloo does not need it, but one code path serves both.

Every group gets the runtime's timeout: ``new_group`` without one keeps torch's default (30
minutes), and a rank stuck in a collective with a hung peer would wait that long. The ranks'
:class:`~lightning_bigmac.runtime.beacon.Beacon` s start here too, once per layout, so that a rank
that loses a peer can find out which one failed first.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

from .beacon import Beacon
from .watch import DEFAULT_TIMEOUT

__all__ = ["PipelineGroups", "global_rank", "layout"]


def global_rank(pipeline_rank: int, dp_rank: int, pp: int) -> int:
    """The global rank of pipeline rank ``pipeline_rank`` in data-parallel replica ``dp_rank``."""
    return dp_rank * pp + pipeline_rank


def layout(pp: int, dp: int) -> dict[str, list[list[int]]]:
    """Global ranks of every pipeline and every data-parallel group, for logs and docs."""
    return {
        "pipelines": [[global_rank(p, d, pp) for p in range(pp)] for d in range(dp)],
        "data_parallel": [[global_rank(p, d, pp) for d in range(dp)] for p in range(pp)],
    }


@dataclass(frozen=True, eq=False)
class PipelineGroups:
    """This rank's place in the ``pp x dp`` layout and the process groups it talks over."""

    pp: int
    dp: int
    rank: int
    """Global rank."""
    pipeline_rank: int
    dp_rank: int
    pipeline_ranks: tuple[int, ...]
    """Global ranks of this rank's pipeline, indexed by pipeline rank."""
    dp_ranks: tuple[int, ...]
    """Global ranks of this rank's data-parallel group, indexed by data-parallel rank."""
    pipeline_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    replica_group: dist.ProcessGroup
    """Every rank holding an encoder/generator replica: all ``pp * dp`` ranks (the world)."""
    channels: dict[tuple[int, int], dist.ProcessGroup]
    """``(src, dst)`` pipeline ranks -> the group carrying messages from ``src`` to ``dst``; only
    pairs that include this rank."""
    beacon: Beacon | None = None
    """This rank's beacon and its peers' addresses (see :mod:`.beacon`)."""
    ends_group: dist.ProcessGroup | None = None
    """The first and the last rank of this rank's pipeline, on those two ranks when ``pp > 1``
    (they hold the tied embedding parameters); None on every other rank."""

    @classmethod
    def create(cls, pp: int, dp: int | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> PipelineGroups:
        """Create every group (a collective: all ranks must call it with the same arguments).

        ``dp`` defaults to ``world_size // pp``. ``timeout`` (seconds) bounds every operation on
        the groups: give the runtime's. Requires an initialised default process group.
        """
        if not dist.is_initialized():
            raise RuntimeError("PipelineGroups.create needs torch.distributed.init_process_group() first")
        world = dist.get_world_size()
        if pp < 1:
            raise ValueError(f"pp must be >= 1, got {pp}")
        dp = world // pp if dp is None else dp
        if pp * dp != world:
            raise ValueError(
                f"pp={pp} x dp={dp} = {pp * dp} ranks but the world has {world}: "
                f"choose pp and dp with pp * dp == {world}"
            )
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        bound = datetime.timedelta(seconds=timeout)
        rank = dist.get_rank()
        me_p, me_d = rank % pp, rank // pp
        ranks = layout(pp, dp)
        # new_group is collective over the world: every rank creates every group in the same order.
        pipeline_group = dp_group = None
        channels: dict[tuple[int, int], dist.ProcessGroup] = {}
        for d, members in enumerate(ranks["pipelines"]):
            group = dist.new_group(members, timeout=bound)
            if d == me_d:
                pipeline_group = group
        for p, members in enumerate(ranks["data_parallel"]):
            group = dist.new_group(members, timeout=bound)
            if p == me_p:
                dp_group = group
        for d in range(dp):
            for src in range(pp):
                for dst in range(pp):
                    if src == dst:
                        continue
                    group = dist.new_group([global_rank(src, d, pp), global_rank(dst, d, pp)], timeout=bound)
                    if d == me_d and me_p in (src, dst):
                        channels[(src, dst)] = group
        assert pipeline_group is not None and dp_group is not None
        ends_group = pipeline_group if pp == 2 and me_p in (0, pp - 1) else None
        for d, members in enumerate(ranks["pipelines"]):
            if pp > 2:
                group = dist.new_group([members[0], members[-1]], timeout=bound)
                if d == me_d and me_p in (0, pp - 1):
                    ends_group = group
        return cls(
            pp=pp,
            dp=dp,
            rank=rank,
            pipeline_rank=me_p,
            dp_rank=me_d,
            pipeline_ranks=tuple(ranks["pipelines"][me_d]),
            dp_ranks=tuple(ranks["data_parallel"][me_p]),
            pipeline_group=pipeline_group,
            dp_group=dp_group,
            replica_group=dist.group.WORLD,
            channels=channels,
            beacon=Beacon.start(),
            ends_group=ends_group,
        )

    def describe(self) -> str:
        """One line for the startup log."""
        return (
            f"rank {self.rank}: pipeline rank {self.pipeline_rank} of {self.pp} in pipeline "
            f"{list(self.pipeline_ranks)}, data-parallel rank {self.dp_rank} of {self.dp} in "
            f"{list(self.dp_ranks)}"
        )
