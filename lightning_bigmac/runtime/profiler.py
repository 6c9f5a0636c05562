"""Per-op timing on every rank, exported as a Chrome trace and as the simulator's cost file.

Each op's compute (after its inputs arrived, before its outputs are posted) is timed with
``time.perf_counter`` and, while a ``torch.profiler`` records, wrapped in a ``record_function``
range named after the op string, so its trace of the same step shows the same names. Clocks are
normalised per step: the pipeline meets at a barrier and each rank measures from the moment it
leaves it. Ranks leave a barrier up to milliseconds apart on busy hosts, as long as a transfer,
so :meth:`OpProfiler.gather` then measures each rank's clock against the gathering rank's with a
few round trips (the offset of the fastest one, as NTP does) and shifts its events by it.

Exports, both built on pipeline rank 0 from every rank's events:

* :func:`chrome_trace`: ``{"traceEvents": [{"ph": "X", "pid": rank, ...}]}``, opens in Perfetto;
* :func:`cost_profile`: the ``bigmac-profile/1`` file :meth:`OpCosts.load` reads, so a real run
  can be replayed by :func:`~lightning_bigmac.schedule.simulate`;
* :func:`planning_costs`: the per-kind means and latency to plan later steps with;
* :func:`measured_simulation`: the profiled step as a :class:`~lightning_bigmac.schedule.Simulation`
  whose intervals are the measured ones, so the simulator's pictures draw the real step.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from lightning_bigmac.schedule import DataFlow, Interval, Op, OpCosts, Plan, Simulation
from lightning_bigmac.schedule.costs import PROFILE_FORMAT

__all__ = [
    "OpEvent",
    "OpProfiler",
    "chrome_trace",
    "cost_profile",
    "measured_simulation",
    "planning_costs",
    "transfer_latency",
]


@dataclass(frozen=True)
class OpEvent:
    """One op's compute on one pipeline rank, in seconds since the step's start barrier."""

    rank: int
    op: str
    start: float
    end: float


class OpProfiler:
    """Collects :class:`OpEvent` s for the current step on this rank."""

    def __init__(self, rank: int, device: torch.device | str = "cpu"):
        self.rank = rank
        self.device = torch.device(device)
        """Where the clock probes live: the rank's GPU with NCCL."""
        self.events: list[OpEvent] = []
        self._t0 = time.perf_counter()

    def start_step(self, group: dist.ProcessGroup | None = None) -> None:
        """Forget the last step and zero the clock, after a barrier on ``group`` when given."""
        if group is not None:
            dist.barrier(group=group)
        self._t0 = time.perf_counter()
        self.events = []

    def now(self) -> float:
        return time.perf_counter() - self._t0

    @contextmanager
    def op(self, op: Op) -> Iterator[None]:
        name = str(op)
        # a range costs ~0.1 ms per op inside a step even with no torch profiler to record it
        with record_function(name) if torch.autograd._profiler_enabled() else nullcontext():
            start = self.now()
            yield
            self.events.append(OpEvent(self.rank, name, start, self.now()))

    def gather(self, group: dist.ProcessGroup, dst: int) -> list[OpEvent] | None:
        """Every rank's events on global rank ``dst`` (None elsewhere), on ``dst``'s clock;
        collective over ``group``."""
        offsets = self._clock_offsets(group, dst)
        size = dist.get_world_size(group)
        out: list[Any] | None = [None] * size if dist.get_rank() == dst else None
        dist.gather_object([asdict(e) for e in self.events], out, dst=dst, group=group)
        if out is None:
            return None
        events = []
        for offset, evs in zip(offsets, out, strict=True):
            events += [OpEvent(e["rank"], e["op"], e["start"] - offset, e["end"] - offset) for e in evs]
        return events

    def _clock_offsets(self, group: dist.ProcessGroup, dst: int, probes: int = 8) -> list[float]:
        """Per rank of ``group``, its clock minus ``dst``'s (on ``dst``; zeros elsewhere).

        ``dst`` sends each rank ``probes`` pings; the rank answers with its clock reading. Taking
        the reading as made at the round trip's midpoint, the fastest round trip bounds the
        error by half its length (~0.1 ms on gloo).
        """
        ranks = dist.get_process_group_ranks(group)
        offsets = [0.0] * len(ranks)
        probe = torch.zeros(1, dtype=torch.float64, device=self.device)
        for i, peer in enumerate(ranks):
            if peer == dst or dist.get_rank() not in (peer, dst):
                continue
            best = math.inf
            for _ in range(probes):
                if dist.get_rank() == dst:
                    sent = self.now()
                    dist.send(probe, peer, group=group)
                    dist.recv(probe, peer, group=group)
                    back = self.now()
                    if back - sent < best:
                        best, offsets[i] = back - sent, probe.item() - (sent + back) / 2
                else:
                    dist.recv(probe, dst, group=group)
                    probe.fill_(self.now())
                    dist.send(probe, dst, group=group)
        return offsets


def chrome_trace(events: Sequence[OpEvent], path: str | Path | None = None) -> dict[str, Any]:
    """Chrome trace JSON (one process per rank, times in microseconds); written to ``path`` if given."""
    trace = {
        "traceEvents": [
            {
                "name": e.op,
                "cat": Op.parse(e.op).module,
                "ph": "X",
                "pid": e.rank,
                "tid": 0,
                "ts": e.start * 1e6,
                "dur": (e.end - e.start) * 1e6,
            }
            for e in events
        ]
        + [
            {"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"PP{r}"}}
            for r in {e.rank for e in events}
        ],
        "displayTimeUnit": "ms",
    }
    if path is not None:
        Path(path).write_text(json.dumps(trace))
    return trace


def transfer_latency(plan: Plan, events: Sequence[OpEvent]) -> float:
    """Transfer latency as the simulator models it, estimated from one profiled step.

    An op whose rank was already idle when its last-finishing producer, on another rank, ended
    waited for exactly the transfer (header, payload, receive, scheduling): the delay from that
    producer's end to the op's start is one sample. Ops whose rank was still busy then say only
    that the transfer took less than their wait, so they are left out. Returns the median
    sample, 0 when no op waited on a peer.
    """
    flow = DataFlow.of_plan(plan)
    at = {(e.rank, e.op): e for e in events}
    prev_end: dict[tuple[int, str], float] = {}
    for rank in range(plan.pp):
        row = sorted((e for e in events if e.rank == rank), key=lambda e: e.start)
        for before, e in itertools.pairwise(row):
            prev_end[(rank, e.op)] = before.end
    samples = []
    for e in events:
        srcs = [at[(r, str(op))] for r, op in flow.producers(e.rank, Op.parse(e.op)) if (r, str(op)) in at]
        if not srcs:
            continue
        last = max(srcs, key=lambda s: s.end)
        if last.rank != e.rank and prev_end.get((e.rank, e.op), 0.0) <= last.end:
            samples.append(e.start - last.end)
    return max(0.0, statistics.median(samples)) if samples else 0.0


def cost_profile(plan: Plan, events: Sequence[OpEvent], path: str | Path | None = None) -> dict[str, Any]:
    """The ``bigmac-profile/1`` cost file for one profiled step; written to ``path`` if given."""
    data = {
        "format": PROFILE_FORMAT,
        "schedule": plan.schedule,
        "pp": plan.pp,
        "vpp": plan.vpp,
        "microbatches": plan.microbatches,
        "latency": transfer_latency(plan, events),
        "events": [asdict(e) for e in sorted(events, key=lambda e: (e.rank, e.start))],
    }
    if path is not None:
        Path(path).write_text(json.dumps(data, indent=1))
    return data


def planning_costs(plan: Plan, events: Sequence[OpEvent]) -> OpCosts:
    """The costs to plan later steps with, from one profiled step: its mean duration per op kind
    and its transfer latency (:meth:`OpCosts.typical` of its :func:`cost_profile`). What
    ``BigMacStrategy(costs="profile")`` plans with after its first step."""
    return OpCosts.from_profile(cost_profile(plan, events)).typical()


def measured_simulation(plan: Plan, events: Sequence[OpEvent]) -> Simulation:
    """The profiled step itself as a :class:`Simulation` (times in seconds).

    Its intervals are the measured op times, in each rank's program order, and its cost model is
    the step's :func:`cost_profile`, so ``draw_gantt`` shows the real step and ``peak_live`` /
    ``live_over_time`` follow what the ranks actually held.
    """
    at = {(e.rank, e.op): e for e in events}
    intervals = []
    for rank, ops in enumerate(plan.ranks):
        missing = [str(op) for op in ops if (rank, str(op)) not in at]
        if missing:
            raise ValueError(f"the profile has no event for {missing[:3]} on PP{rank}: not this plan's step")
        intervals.append(
            tuple(Interval(rank, op, at[(rank, str(op))].start, at[(rank, str(op))].end) for op in ops)
        )
    return Simulation(plan, OpCosts.from_profile(cost_profile(plan, events)), tuple(intervals))
