"""Split the LLM blocks into ``pp * vpp`` stages and place this rank's stages, freeing the rest.

Stage ``s = chunk * pp + rank`` (Megatron's interleaved layout, as in the plan) holds a contiguous
run of blocks; stage 0 also holds the embedding (token embedding + merge of encoder outputs), the
last stage the head (final norm, LM head, text loss). Encoder, generator and an ``nn.Module``
stage context are replicated on every rank and are not partitioned. Parameters tied between the
embedding and the head stay on every rank that holds either.

Balance: by default each block costs its parameter count (the right measure for dense blocks of
one model); pass ``costs`` (e.g. profiled block times) or explicit ``split_points`` instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .parts import PipelineParts, run_blocks

__all__ = ["Partition", "Stage", "balanced_bounds", "partition", "place"]


def balanced_bounds(costs: Sequence[float], num_stages: int) -> tuple[int, ...]:
    """Contiguous split of ``costs`` into ``num_stages`` non-empty runs minimising the costliest run.

    Returns the ``num_stages + 1`` bounds (``0 = b_0 < b_1 < ... = len(costs)``). Dynamic
    programme over (stage, end): O(stages x blocks^2), a few ms for hundreds of blocks.
    """
    n = len(costs)
    if num_stages > n:
        raise ValueError(f"cannot split {n} blocks into {num_stages} stages: use pp * vpp <= {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][e]: smallest max-run cost splitting blocks[:e] into k runs; cut[k][e]: start of the k-th run.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for e in range(k, n - (num_stages - k) + 1):
            for b in range(k - 1, e):
                cost = max(best[k - 1][b], prefix[e] - prefix[b])
                if cost < best[k][e]:
                    best[k][e], cut[k][e] = cost, b
    bounds, e = [n], n
    for k in range(num_stages, 0, -1):
        e = cut[k][e]
        bounds.append(e)
    return tuple(reversed(bounds))


@dataclass(frozen=True)
class Partition:
    """Which blocks each stage holds: stage ``s`` has ``blocks[bounds[s]:bounds[s + 1]]``."""

    pp: int
    vpp: int
    bounds: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return self.pp * self.vpp

    def blocks_of(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def stages_of(self, rank: int) -> list[int]:
        """Stages on ``rank``, by chunk."""
        return [c * self.pp + rank for c in range(self.vpp)]

    def describe(self) -> str:
        return ", ".join(f"stage {s}: blocks {list(self.blocks_of(s))}" for s in range(self.num_stages))


def partition(
    parts: PipelineParts,
    pp: int,
    vpp: int = 1,
    *,
    costs: Sequence[float] | None = None,
    split_points: Sequence[int] | None = None,
) -> Partition:
    """Partition ``parts.blocks`` into ``pp * vpp`` stages.

    ``split_points``: the first block of stages 1..S-1 (S-1 increasing indices), overriding the
    balancer. ``costs``: one number per block for the balancer; default the parameter count.
    """
    n, stages = len(parts.blocks), pp * vpp
    if split_points is not None:
        bounds = (0, *(int(x) for x in split_points), n)
        if len(bounds) != stages + 1 or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(
                f"split_points={list(split_points)} must be {stages - 1} increasing block indices in "
                f"1..{n - 1} "
                f"(pp={pp} x vpp={vpp} stages over {n} blocks), each stage getting at least one block"
            )
        return Partition(pp, vpp, bounds)
    if costs is None:
        costs = [sum(p.numel() for p in b.parameters()) for b in parts.blocks]
    elif len(costs) != n:
        raise ValueError(f"costs has {len(costs)} entries but there are {n} blocks: give one cost per block")
    return Partition(pp, vpp, balanced_bounds(costs, stages))


class Stage(nn.Module):
    """One stage: its blocks, plus the embedding on stage 0 and the head on the last stage.

    ``forward(x, mb)`` returns the stage's output hidden state, with the stage context built once
    (:func:`~.parts.run_blocks`); the executor applies ``head`` itself because the last stage's
    hidden state also feeds the generator.
    """

    def __init__(
        self,
        index: int,
        blocks: Sequence[nn.Module],
        embedding: nn.Module | None,
        head: nn.Module | None,
        context: Callable[[Any, Any], Any] | None = None,
    ):
        super().__init__()
        self.index = index
        self.embedding = embedding
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        # Not a submodule: every stage of the rank shares it, and it has nothing to train or sync.
        self.__dict__["context"] = context

    def forward(self, x, mb):
        h = self.embedding(mb, x) if self.embedding is not None else x
        return run_blocks(self.blocks, h, mb, self.context)


def _materialise(
    module: nn.Module, device: torch.device, fill: Callable[[nn.Module], None] | None = None
) -> None:
    """Allocate a meta-initialised module on ``device`` and give it values: ``fill(module)`` when given
    (``PipelineParts.fill_part``, which sets buffers too), else every submodule's ``reset_parameters``."""
    tensors = [*module.parameters(), *(module.buffers() if fill is not None else ())]
    if not any(t.is_meta for t in tensors):
        module.to(device)
        return
    module.to_empty(device=device)
    if fill is not None:
        fill(module)
        return
    for sub in module.modules():
        if callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()
        elif any(True for _ in sub.parameters(recurse=False)):
            raise ValueError(
                f"{type(sub).__name__} was created on the meta device but has no reset_parameters(): "
                "give it one, or build the model on a real device"
            )


def place(
    parts: PipelineParts, split: Partition, rank: int, device: torch.device | str = "cpu"
) -> list[Stage]:
    """Build ``rank``'s stages (one per chunk) on ``device``; free every LLM part the rank does not own.

    Freed parts move to the meta device (no storage); parts created on the meta device and owned
    here are materialised (and filled by ``parts.fill_part`` when given). Encoder, generator and an
    ``nn.Module`` context are replicated, so every rank materialises them. A parameter tied between
    embedding and head (``parts.tied``) is the held part's on a rank that holds only one of the two,
    and the embedding's otherwise, in both parts: moving a part to the meta device would replace it
    there and break the tie.
    """
    device = torch.device(device)
    last = split.num_stages - 1
    mine = split.stages_of(rank)
    owned = {i for s in mine for i in split.blocks_of(s)}
    for i, block in enumerate(parts.blocks):
        if i in owned:
            _materialise(block, device, parts.fill_part)
        else:
            block.to("meta")
    for module, stage in ((parts.embedding, 0), (parts.head, last)):
        if stage in mine:
            _materialise(module, device, parts.fill_part)
        else:
            module.to("meta")
    for module in (parts.encoder, parts.generator, parts.context):
        if isinstance(module, nn.Module):
            _materialise(module, device, parts.fill_part)
    _retie(parts, keep_head=last in mine and 0 not in mine)
    return [
        Stage(
            s,
            [parts.blocks[i] for i in split.blocks_of(s)],
            parts.embedding if s == 0 else None,
            parts.head if s == last else None,
            parts.context,
        )
        for s in mine
    ]


def _retie(parts: PipelineParts, keep_head: bool) -> None:
    """Make each tied pair one parameter again: the head's when ``keep_head``, else the embedding's."""
    for in_embedding, in_head in parts.tied:
        src, dst = (parts.head, parts.embedding) if keep_head else (parts.embedding, parts.head)
        src_name, dst_name = (in_head, in_embedding) if keep_head else (in_embedding, in_head)
        path, _, leaf = dst_name.rpartition(".")
        setattr(dst.get_submodule(path), leaf, src.get_parameter(src_name))
