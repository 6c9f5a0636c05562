"""Classic partitioners on plain lists of numbers; every function returns index lists.

Nothing here knows about samples or schedules: the packer (``packing.py``) maps its problem onto
these, which keeps each algorithm small, testable on numbers, and replaceable. Invariants
(every index placed exactly once, capacities respected, permutations) are checked on return.

* :func:`lpt` -- Graham's *longest processing time first*: items in decreasing weight, each to
  the least-loaded part. Without a capacity its largest part is at most ``4/3 - 1/(3m)`` times
  the optimum (Graham 1969) and exceeds the mean by at most the last item placed on it, which
  is small when parts hold many items. A capacity can make an item skip the least-loaded part;
  the bound then holds only while no part is nearly full.
* :func:`neighbour_groups` -- sorted consecutive groups: for a fixed group size this minimises
  the spread inside groups of a one-dimensional quantity.
* :func:`exchange_refine` -- pairwise exchange (the 2-opt of number partitioning) of items between
  the parts of one group, lowering the group's largest secondary load while keeping every part's
  primary load under a bound, so the primary's guarantee survives.
* :func:`snake_deal` -- boustrophedon dealing of sorted items into equal-count parts.
* :func:`light_ends_order` -- the lightest items at both ends of a sequence, heaviest in the middle.
* :func:`assign_rounds` -- list scheduling over rounds: in each round (a group) the heaviest item
  goes to the worker with the least accumulated load, so each round is a permutation.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "IndexPartition",
    "assign_rounds",
    "exchange_refine",
    "light_ends_order",
    "lpt",
    "neighbour_groups",
    "snake_deal",
]


@dataclass(frozen=True)
class IndexPartition:
    """Index lists, one per part, and the items no part had room for."""

    parts: list[list[int]]
    unplaced: list[int]


def _check_cover(parts: Sequence[Sequence[int]], n: int, extra: Sequence[int] = ()) -> None:
    seen = sorted([i for p in parts for i in p] + list(extra))
    assert seen == list(range(n)), f"partition lost or repeated items: {len(seen)} placed of {n}"


def lpt(
    weights: Sequence[float],
    parts: int,
    *,
    sizes: Sequence[int] | None = None,
    capacity: int | None = None,
) -> IndexPartition:
    """Longest processing time first: ``parts`` index lists with balanced total weight.

    With ``sizes`` and ``capacity`` an item goes to the least-loaded part that has room for its
    size; an item no part has room for is returned in ``unplaced`` (never split, never dropped).
    Ties go to the part with fewer items, then the lower index: deterministic, and with at least
    as many items as parts (all fitting) no part stays empty.
    """
    if parts < 1:
        raise ValueError(f"lpt needs parts >= 1, got {parts}")
    if (sizes is None) != (capacity is None):
        raise ValueError("lpt: give both sizes and capacity, or neither")
    n = len(weights)
    order = sorted(range(n), key=lambda i: (-weights[i], i))
    out: list[list[int]] = [[] for _ in range(parts)]
    unplaced: list[int] = []
    heap = [(0.0, 0, p) for p in range(parts)]  # (load, items, part): equal loads go to the emptier part
    if sizes is None:
        for i in order:
            load, count, p = heap[0]
            out[p].append(i)
            heapq.heapreplace(heap, (load + weights[i], count + 1, p))
    else:
        used = [0] * parts
        for i in order:
            skipped = []
            while heap and used[heap[0][2]] + sizes[i] > capacity:
                skipped.append(heapq.heappop(heap))
            if heap:
                load, count, p = heap[0]
                out[p].append(i)
                used[p] += sizes[i]
                heapq.heapreplace(heap, (load + weights[i], count + 1, p))
            else:
                unplaced.append(i)
            for entry in skipped:
                heapq.heappush(heap, entry)
        assert max(used) <= capacity
    _check_cover(out, n, unplaced)
    return IndexPartition(out, unplaced)


def neighbour_groups(weights: Sequence[float], group_size: int) -> list[list[int]]:
    """Indices sorted by weight, cut into consecutive groups of ``group_size`` (the last may be short)."""
    order = sorted(range(len(weights)), key=lambda i: (weights[i], i))
    return [order[k : k + group_size] for k in range(0, len(order), group_size)]


def exchange_refine(
    parts: list[list[int]],
    *,
    primary: Sequence[float],
    secondary: Sequence[float],
    sizes: Sequence[int],
    capacity: int,
    primary_bound: float,
    tolerance: float = 0.005,
    max_rounds: int = 32,
) -> list[list[int]]:
    """Move or swap items between ``parts`` (one group) to lower the largest secondary load.

    Each round takes the part with the largest secondary load and applies the single move or
    swap with any other part that lowers the larger of the two parts' secondary loads most,
    subject to both parts keeping primary load <= ``primary_bound`` and size <= ``capacity``.
    Stops when the heaviest part is within ``tolerance`` of the mean, when no exchange improves
    (a local optimum) or after ``max_rounds``. The group's
    largest secondary load never rises, no part's primary load crosses the bound (if it started
    under it) and no part is emptied.
    """
    parts = [list(p) for p in parts]
    sec = [sum(secondary[i] for i in p) for p in parts]
    pri = [sum(primary[i] for i in p) for p in parts]
    size = [sum(sizes[i] for i in p) for p in parts]
    good_enough = (1.0 + tolerance) * sum(sec) / len(parts)
    for _ in range(max_rounds):
        x = max(range(len(parts)), key=sec.__getitem__)
        if sec[x] <= good_enough:
            break
        best, move = sec[x], None
        leaving_x = [(secondary[a], primary[a], sizes[a], a) for a in parts[x]]
        # b = None is a one-way move of a from x to y: allowed unless it would empty x
        stay = [(0.0, 0.0, 0, None)] if len(parts[x]) > 1 else []
        for y in range(len(parts)):
            if y == x:
                continue
            leaving_y = sorted([(secondary[b], primary[b], sizes[b], b) for b in parts[y]] + stay, key=_first)
            keys = [t[0] for t in leaving_y]
            for sa, pa, za, a in leaving_x:
                # moving d = sa - sb from x to y improves iff sec[x] - best < d < best - sec[y];
                # leaving_y is sorted by sb, so d falls along it
                for sb, pb, zb, b in leaving_y[bisect.bisect_right(keys, sa - (best - sec[y])) :]:
                    d = sa - sb
                    if d <= sec[x] - best:
                        break
                    if sec[y] + d >= best:
                        continue
                    if pri[x] - pa + pb > primary_bound or pri[y] - pb + pa > primary_bound:
                        continue
                    if size[x] - za + zb > capacity or size[y] - zb + za > capacity:
                        continue
                    best, move = max(sec[x] - d, sec[y] + d), (y, a, b, d, pa - pb, za - zb)
        if move is None:
            break
        y, a, b, d, dp, dz = move
        parts[x].remove(a)
        parts[y].append(a)
        if b is not None:
            parts[y].remove(b)
            parts[x].append(b)
        sec[x], sec[y] = sec[x] - d, sec[y] + d
        pri[x], pri[y] = pri[x] - dp, pri[y] + dp
        size[x], size[y] = size[x] - dz, size[y] + dz
    return parts


def _first(t: tuple) -> float:
    return t[0]


def snake_deal(weights: Sequence[float], parts: int) -> list[list[int]]:
    """Deal indices, heaviest first, to ``parts`` in boustrophedon order (0..k-1, k-1..0, ...).

    Every part gets ``len(weights) // parts`` or one more item, and each part receives one item
    from every consecutive run of ``parts`` in sorted order, so part totals stay close.
    """
    if parts < 1:
        raise ValueError(f"snake_deal needs parts >= 1, got {parts}")
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    out: list[list[int]] = [[] for _ in range(parts)]
    for k, i in enumerate(order):
        lap, pos = divmod(k, parts)
        out[pos if lap % 2 == 0 else parts - 1 - pos].append(i)
    _check_cover(out, len(weights))
    return out


def light_ends_order(weights: Sequence[float]) -> list[int]:
    """A permutation putting the lightest items at both ends and the heaviest in the middle.

    Sorted ascending, items alternate between the front and the back: ``w0, w2, w4, ..., w5,
    w3, w1``. In a pipeline the first items run while it fills and the last while it drains,
    when nothing else overlaps them.
    """
    order = sorted(range(len(weights)), key=lambda i: (weights[i], i))
    perm = order[0::2] + order[1::2][::-1]
    _check_cover([perm], len(weights))
    return perm


def assign_rounds(rounds: Sequence[Sequence[float]], workers: int) -> list[list[int]]:
    """For each round of ``workers`` item weights, the worker of each item (a permutation).

    Rounds are taken in order; within a round the heaviest item goes to the worker with the
    least accumulated load (list scheduling). By induction over rounds, per-worker totals stay
    within the heaviest item of each other, however uneven the rounds.
    """
    load = [0.0] * workers
    out = []
    for weights in rounds:
        if len(weights) != workers:
            raise ValueError(
                f"assign_rounds: a round has {len(weights)} items but there are {workers} workers"
            )
        free = sorted(range(workers), key=lambda w: (load[w], w))
        owner = [0] * workers
        for k, item in enumerate(sorted(range(workers), key=lambda i: (-weights[i], i))):
            owner[item] = free[k]
            load[free[k]] += weights[item]
        assert sorted(owner) == list(range(workers))
        out.append(owner)
    return out
