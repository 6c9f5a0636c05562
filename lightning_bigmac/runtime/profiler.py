"""Per-op timing on every rank, exported as a Chrome trace and as the simulator's cost file.

Each op's compute (after its inputs arrived, before its outputs are posted) is timed with
``time.perf_counter`` on CPU and with CUDA events on a GPU (the host returns from a kernel launch
long before the kernel ends, so a host clock would time launches: :class:`DeviceClock`), and,
while a ``torch.profiler`` records, wrapped in a ``record_function`` range named after the op
string, so its trace of the same step shows the same names. Clocks are
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from lightning_bigmac.schedule import DataFlow, Interval, Op, OpCosts, Plan, Simulation
from lightning_bigmac.schedule.costs import PROFILE_FORMAT

from .collectives import barrier, gather_object, recv_tensor, send_tensor
from .watch import DEFAULT_TIMEOUT, PeerWatch

__all__ = [
    "DeviceClock",
    "OpEvent",
    "OpProfiler",
    "chrome_trace",
    "cost_profile",
    "device_clock",
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


class DeviceClock:
    """Op times on a device's own timeline: an event recorded on the current stream at each op's
    start and end, read (after one synchronisation) as seconds since the step's origin event.

    ``event`` makes a timing event (``torch.cuda.Event(enable_timing=True)`` on CUDA) with
    ``record()`` and ``elapsed_time(other)`` in milliseconds; ``synchronize`` waits for the device.
    """

    def __init__(self, event: Callable[[], Any], synchronize: Callable[[], None]):
        self._event, self._synchronize = event, synchronize
        self._origin: Any = None

    def start(self) -> None:
        """Mark the step's origin on the device's stream, once the device has caught up with the
        host (so the origin is the host's zero too, and the ranks' host clocks align the events)."""
        self._synchronize()
        self._origin = self._event()
        self._origin.record()

    def mark(self) -> Any:
        """An event recorded now on the device's stream."""
        event = self._event()
        event.record()
        return event

    def seconds(self, marks: Sequence[Any]) -> list[float]:
        """Seconds from the origin to each of ``marks`` (waits for the device once)."""
        self._synchronize()
        return [self._origin.elapsed_time(m) / 1000.0 for m in marks]


def device_clock(device: torch.device) -> DeviceClock | None:
    """The :class:`DeviceClock` of ``device`` when it is a GPU, else None (the host clock is the device's)."""
    if device.type != "cuda":
        return None
    return DeviceClock(lambda: torch.cuda.Event(enable_timing=True), lambda: torch.cuda.synchronize(device))


class OpProfiler:
    """Collects :class:`OpEvent` s for the current step on this rank.

    ``clock``: a :class:`DeviceClock` to time ops on (default :func:`device_clock` of ``device``:
    CUDA events on a GPU, the host's ``perf_counter`` otherwise).
    """

    def __init__(
        self,
        rank: int,
        device: torch.device | str = "cpu",
        watch: PeerWatch | None = None,
        clock: DeviceClock | None = None,
    ):
        self.rank = rank
        self.device = torch.device(device)
        """Where the clock probes live: the rank's GPU with NCCL."""
        self.watch = watch or PeerWatch(rank, DEFAULT_TIMEOUT)
        """Bounds and names the profiler's waits on peers (the executor's, in a run)."""
        self.clock = clock if clock is not None else device_clock(self.device)
        self._events: list[OpEvent] = []
        self._marks: list[tuple[str, Any, Any]] = []
        """Ops timed on the device clock, not read yet: (name, start mark, end mark)."""
        self._t0 = time.perf_counter()

    def start_step(self, group: dist.ProcessGroup | None = None) -> None:
        """Forget the last step and zero the clock, after a barrier on ``group`` when given."""
        if group is not None:
            barrier(group, self.watch, "the profiler's step barrier")
        self._t0 = time.perf_counter()
        if self.clock is not None:
            self.clock.start()
        self._events, self._marks = [], []

    def now(self) -> float:
        """Host seconds since the step's start."""
        return time.perf_counter() - self._t0

    @property
    def events(self) -> list[OpEvent]:
        """This step's ops so far, in seconds since its start (device-clock marks read here)."""
        if self._marks:
            assert self.clock is not None
            times = self.clock.seconds([m for _, start, end in self._marks for m in (start, end)])
            self._events += [
                OpEvent(self.rank, name, times[2 * i], times[2 * i + 1])
                for i, (name, _, _) in enumerate(self._marks)
            ]
            self._marks = []
        return self._events

    @contextmanager
    def op(self, op: Op) -> Iterator[None]:
        name = str(op)
        # a range costs ~0.1 ms per op inside a step even with no torch profiler to record it
        with record_function(name) if torch.autograd._profiler_enabled() else nullcontext():
            if self.clock is not None:
                start = self.clock.mark()
                yield
                self._marks.append((name, start, self.clock.mark()))
            else:
                begun = self.now()
                yield
                self._events.append(OpEvent(self.rank, name, begun, self.now()))

    def gather(self, group: dist.ProcessGroup, dst: int) -> list[OpEvent] | None:
        """Every rank's events on global rank ``dst`` (None elsewhere), on ``dst``'s clock from the
        moment the first rank left the step's barrier (a rank may leave it before ``dst``, so its
        first op can start before ``dst``'s zero); collective over ``group``."""
        offsets = self._clock_offsets(group, dst)
        mine = [asdict(e) for e in self.events]
        out = gather_object(mine, dst, group, self.watch, "the profiler's event gather", self.device)
        if out is None:
            return None
        events = []
        for offset, evs in zip(offsets, out, strict=True):
            events += [OpEvent(e["rank"], e["op"], e["start"] - offset, e["end"] - offset) for e in evs]
        early = min([0.0, *(e.start for e in events)])
        return [OpEvent(e.rank, e.op, e.start - early, e.end - early) for e in events]

    def _clock_offsets(self, group: dist.ProcessGroup, dst: int, probes: int = 8) -> list[float]:
        """Per rank of ``group``, its clock minus ``dst``'s (on ``dst``; zeros elsewhere).

        ``dst`` sends each rank ``probes`` pings; the rank answers with its clock reading. Taking
        the reading as made at the round trip's midpoint, the fastest round trip bounds the
        error by half its length (~0.1 ms on gloo).
        """
        ranks = dist.get_process_group_ranks(group)
        offsets = [0.0] * len(ranks)
        probe = torch.zeros(1, dtype=torch.float64, device=self.device)
        what = "the profiler's clock probes"
        for i, peer in enumerate(ranks):
            if peer == dst or dist.get_rank() not in (peer, dst):
                continue
            best = math.inf
            for _ in range(probes):
                if dist.get_rank() == dst:
                    sent = self.now()
                    send_tensor(probe, peer, group, self.watch, what)
                    recv_tensor(probe, peer, group, self.watch, what)
                    back = self.now()
                    if back - sent < best:
                        best, offsets[i] = back - sent, probe.item() - (sent + back) / 2
                else:
                    recv_tensor(probe, dst, group, self.watch, what)
                    probe.fill_(self.now())
                    send_tensor(probe, dst, group, self.watch, what)
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
