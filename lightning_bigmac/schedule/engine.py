"""Discrete-event replay of per-rank op lists: the clock shared by the simulator and the builders.

Each rank runs its ops in order; an op starts when the rank is free and every producer
(:class:`~lightning_bigmac.schedule.dataflow.DataFlow`) has finished, plus ``latency`` when the
producer ran on another rank. Sends never block the sender, as in the runtime.

Builders of nested schedules also pass a *column policy*: when an op finishes, the policy may
release column ops (encoder or generator work for a whole group). A released op is queued on
its rank and runs at that rank's first op boundary at or after the release time, before the
rank's next listed op (columns run "immediately": docs/schedules.md, "The nested schedule").
The order in which ops actually ran is the plan the builder returns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

from .costs import OpCosts
from .dataflow import DataFlow, PlacedOp
from .plan import Op

__all__ = ["ColumnPolicy", "Deadlock", "Interval", "replay"]


class Interval(NamedTuple):
    """One op's run on one rank, in the cost model's time unit."""

    rank: int
    op: Op
    start: float
    end: float


class Deadlock(RuntimeError):
    """No rank can start its next op. ``waiting`` maps each stuck rank to (next op, missing producers)."""

    def __init__(self, waiting: dict[int, tuple[Op, list[PlacedOp]]]):
        self.waiting = waiting
        parts = [
            f"PP{r} waits at {op} for " + ", ".join(f"{o}@PP{pr}" for pr, o in missing)
            for r, (op, missing) in sorted(waiting.items())
        ]
        super().__init__("deadlock: " + "; ".join(parts))


class ColumnPolicy(Protocol):
    def on_finish(self, rank: int, op: Op, end: float) -> Iterable[PlacedOp]:
        """Column ops released by ``op`` finishing on ``rank`` at time ``end``."""


def replay(
    static: Sequence[Sequence[Op]],
    flow: DataFlow,
    costs: OpCosts,
    policy: ColumnPolicy | None = None,
) -> list[list[Interval]]:
    """Run the ranks' op lists (and any released columns) on the clock; return each rank's intervals.

    Raises :class:`Deadlock` if the ranks stop with work left.
    """
    pp, lat = len(static), costs.latency
    nxt = [0] * pp
    free = [0.0] * pp
    columns: list[deque[tuple[float, Op]]] = [deque() for _ in range(pp)]
    done: dict[PlacedOp, float] = {}
    out: list[list[Interval]] = [[] for _ in range(pp)]

    producers: dict[PlacedOp, tuple[PlacedOp, ...]] = {}
    waiters: dict[PlacedOp, list[int]] = {}  # unfinished producer -> ranks blocked on it

    def ready(rank: int, op: Op) -> float | None:
        """Earliest time ``op``'s inputs are on ``rank``; None (and a wake-up registered) if not yet."""
        key = (rank, op)
        srcs = producers.get(key)
        if srcs is None:
            srcs = producers[key] = flow.producers(rank, op)
        t = 0.0
        for src in srcs:
            e = done.get(src)
            if e is None:
                waiters.setdefault(src, []).append(rank)
                return None
            if src[0] != rank:
                e += lat
            if e > t:
                t = e
        return t

    def candidate(rank: int) -> tuple[float, bool] | None:
        col = None
        if columns[rank]:
            released, op = columns[rank][0]
            t = ready(rank, op)
            if t is not None:
                col = max(free[rank], released, t)
        listed = None
        if nxt[rank] < len(static[rank]):
            t = ready(rank, static[rank][nxt[rank]])
            if t is not None:
                listed = max(free[rank], t)
        if col is not None and (listed is None or col <= listed):
            return (col, True)
        return None if listed is None else (listed, False)

    cand = [candidate(r) for r in range(pp)]
    while True:
        best, best_start = -1, 0.0
        for r in range(pp):
            c = cand[r]
            if c is not None and (best < 0 or c[0] < best_start):
                best, best_start = r, c[0]
        if best < 0:
            break
        is_column = cand[best][1]
        if is_column:
            op = columns[best].popleft()[1]
        else:
            op = static[best][nxt[best]]
            nxt[best] += 1
        end = best_start + costs.duration(best, op, flow.frozen)
        free[best] = end
        done[(best, op)] = end
        out[best].append(Interval(best, op, best_start, end))
        dirty = {best, *waiters.pop((best, op), ())}
        if policy is not None:
            for rank, col_op in policy.on_finish(best, op, end):
                columns[rank].append((end, col_op))
                dirty.add(rank)
        for r in dirty:
            cand[r] = candidate(r)

    waiting = {}
    for r in range(pp):
        head = columns[r][0][1] if columns[r] else (static[r][nxt[r]] if nxt[r] < len(static[r]) else None)
        if head is not None:
            waiting[r] = (head, [s for s in flow.producers(r, head) if s not in done])
    if waiting:
        raise Deadlock(waiting)
    return out
