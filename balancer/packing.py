"""Pack one step's samples into microbatches, groups and owners: the balancing policy.

In the nested schedule every microbatch passes through every LLM stage, so one expensive
microbatch stalls the pipeline; encoder and generator work runs in *columns*, one microbatch of
a group per rank, so a column lasts as long as its heaviest member. Hence, for ``R`` replicas of
``M`` microbatches and ``P`` pipeline ranks:

1. **LLM balance** -- :func:`~balancer.partition.lpt` splits the samples into ``R * M``
   microbatches of near-equal LLM cost, none over the token cap.
2. **Column balance** -- microbatches sorted by owner cost (encoder plus generator) form groups
   of ``P`` neighbours; :func:`~balancer.partition.exchange_refine` then swaps samples inside each
   group to even out its members, never pushing a microbatch's additive LLM cost over
   ``max(largest LPT load, (1 + llm_tolerance) * mean)``.
3. **Replicas** -- groups are dealt to replicas in snake order of their column cost, so every
   replica gets the same ``M`` and a similar mix (replicas wait for each other at the step's
   gradient reduction).
4. **Order and owners** -- in each replica the lightest groups go first and last, where the
   pipeline fills and drains and nothing overlaps their columns; inside each group the
   heaviest microbatch goes to the rank with the least owner work so far.

Encoder and LLM cost are correlated per sample (image tokens pass through both), so step 2 can
only trade samples of similar LLM cost; text-only samples are what it moves most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import BalancerConfig
from .cost import SampleCost
from .partition import assign_rounds, exchange_refine, light_ends_order, lpt, neighbour_groups, snake_deal

__all__ = ["PackResult", "StepPlan", "pack"]


@dataclass(frozen=True)
class StepPlan:
    """One replica's step: sample indices per microbatch, in execution order, and their owners."""

    microbatches: tuple[tuple[int, ...], ...]
    owners: tuple[int, ...]
    """Pipeline rank running microbatch ``j``'s encoder and generator work; a permutation of
    ``0..P-1`` within each group of ``P`` consecutive microbatches."""


@dataclass(frozen=True)
class PackResult:
    replicas: tuple[StepPlan, ...]
    """One plan per data-parallel replica, each of ``config.microbatches`` microbatches."""
    unplaced: tuple[int, ...]
    """Samples no microbatch had room for (the caller keeps them for a later step)."""


def pack(costs: Sequence[SampleCost], config: BalancerConfig, *, replicas: int = 1) -> PackResult:
    """Split samples (by their costs) into ``replicas`` steps of ``config.microbatches`` microbatches.

    Every sample lands in exactly one microbatch or in ``unplaced``; a microbatch stays empty
    only when there are fewer samples than microbatches.
    """
    if replicas < 1:
        raise ValueError(f"pack: replicas must be >= 1, got {replicas}")
    p, m = config.pipeline_size, config.microbatches
    total = replicas * m
    llm = [c.llm for c in costs]
    owner = [c.owner for c in costs]
    tokens = [c.tokens for c in costs]
    first = lpt(llm, total, sizes=tokens, capacity=config.token_cap)

    loads = [sum(llm[i] for i in mb) for mb in first.parts]
    bound = max(max(loads), (1.0 + config.llm_tolerance) * sum(loads) / total)
    groups: list[list[list[int]]] = []
    for members in neighbour_groups([sum(owner[i] for i in mb) for mb in first.parts], p):
        groups.append(
            exchange_refine(
                [first.parts[k] for k in members],
                primary=llm,
                secondary=owner,
                sizes=tokens,
                capacity=config.token_cap,
                primary_bound=bound,
            )
        )

    owner_loads = [[sum(owner[i] for i in mb) for mb in group] for group in groups]
    column = [max(members) for members in owner_loads]  # a column lasts as long as its heaviest member
    plans = []
    for dealt in snake_deal(column, replicas):
        order = [dealt[k] for k in light_ends_order([column[g] for g in dealt])]
        ranks = assign_rounds([owner_loads[g] for g in order], p)
        plans.append(
            StepPlan(
                microbatches=tuple(tuple(sorted(mb)) for g in order for mb in groups[g]),
                owners=tuple(r for rs in ranks for r in rs),
            )
        )
    result = PackResult(tuple(plans), tuple(first.unplaced))
    _check(result, costs, config)
    return result


def _check(result: PackResult, costs: Sequence[SampleCost], config: BalancerConfig) -> None:
    placed = [i for plan in result.replicas for mb in plan.microbatches for i in mb]
    assert sorted(placed + list(result.unplaced)) == list(range(len(costs))), "pack lost or repeated a sample"
    p = config.pipeline_size
    for plan in result.replicas:
        assert len(plan.microbatches) == len(plan.owners) == config.microbatches
        for mb in plan.microbatches:
            assert sum(costs[i].tokens for i in mb) <= config.token_cap
        for g in range(0, config.microbatches, p):
            assert sorted(plan.owners[g : g + p]) == list(range(p))
