"""Profiler exports: a Chrome trace of every op, and a cost file from which the simulator predicts
the profiled run's step time (op ends measured from the step's start barrier) within 15%; events
of all ranks on one clock; the transfer latency estimated from ops that waited for one."""

from __future__ import annotations

import itertools
import json
import statistics
from typing import Any

import pytest
import torch

from lightning_bigmac.runtime import OpEvent, OpProfiler, chrome_trace, cost_profile, transfer_latency
from lightning_bigmac.runtime.profiler import DeviceClock, device_clock
from lightning_bigmac.schedule import Op, OpCosts, Plan, build_plan, simulate
from lightning_bigmac.testing.scenarios import skewed_clocks
from lightning_bigmac.testing.spawn import run


def _profiles(run_layout) -> list[tuple[Plan, list]]:
    cases, results = run_layout(2, 1, 1)
    out = []
    for i, case in enumerate(cases):
        if case.get("measure") == "profile":
            got = results[0][i]  # pipeline rank 0 gathers every rank's events
            out.append((Plan.from_dict(got["plan"]), got["records"]))
    assert out
    return out


@pytest.mark.slow
def test_chrome_trace_has_every_op_of_every_rank(run_layout, tmp_path) -> None:
    for plan, records in _profiles(run_layout):
        path = tmp_path / f"{plan.schedule}.json"
        chrome_trace(records[-1]["events"], path)
        trace = json.loads(path.read_text())
        spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert sorted((e["pid"], e["name"]) for e in spans) == sorted(
            (r, str(op)) for r, ops in enumerate(plan.ranks) for op in ops
        )
        assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)


@pytest.mark.slow
def test_simulator_fed_with_a_profile_predicts_the_step(run_layout, tmp_path) -> None:
    for plan, records in _profiles(run_layout):
        errors = []
        for k, rec in enumerate(records):
            path = tmp_path / f"{plan.schedule}-{k}.json"
            cost_profile(plan, rec["events"], path)
            predicted = simulate(plan, OpCosts.load(path)).step_time
            measured = max(e.end for e in rec["events"])
            errors.append(abs(predicted / measured - 1))
        print(plan.schedule, "profile -> simulate errors per step:", [f"{e:.3f}" for e in errors])
        assert statistics.median(errors) <= 0.15, errors


@pytest.mark.slow
def test_gather_puts_every_rank_on_one_clock() -> None:
    """Rank 1 starts its clock 0.3 s late; the gathered events still show both ops together."""
    events, _ = run(skewed_clocks, 2, 0.3, timeout=60.0)
    first, second = sorted(events, key=lambda e: e.rank)
    assert first.start > 0.25  # rank 0 waited for rank 1 at the barrier on its own clock
    assert abs(second.start - first.start) < 0.02


def _shifted(events: list[OpEvent], delay: float) -> list[OpEvent]:
    """``events`` with ``delay`` added before every op that started as its rank's previous op
    ended (its input was in): the runtime's per-op cost, which is no transfer."""
    out = []
    for rank in {e.rank for e in events}:
        row = sorted((e for e in events if e.rank == rank), key=lambda e: e.start)
        out.append(row[0])
        for before, e in itertools.pairwise(row):
            late = delay if e.start == before.end else 0.0
            out.append(OpEvent(e.rank, e.op, e.start + late, e.end))
    return out


def test_latency_comes_only_from_ops_that_waited_for_a_transfer() -> None:
    plan = build_plan("bigmac", pp=2, microbatches=8)
    m = plan.microbatches
    costs = OpCosts(
        encoder_forward=tuple(1.0 + 0.1 * j for j in range(m)),
        llm_forward=tuple(2.0 + 0.3 * (j % 3) for j in range(m)),
        llm_backward=tuple(4.0 - 0.2 * (j % 2) for j in range(m)),
        latency=0.25,
    )
    sim = simulate(plan, costs)
    events = [OpEvent(iv.rank, str(iv.op), iv.start, iv.end) for row in sim.intervals for iv in row]
    assert transfer_latency(plan, events) == pytest.approx(0.25)
    # a gap after a busy rank's previous op is the runtime's own cost, not a transfer
    assert transfer_latency(plan, _shifted(events, 0.1)) == pytest.approx(0.25)


def test_ops_are_named_in_a_torch_profiler_trace_only_while_one_records() -> None:
    profiler = OpProfiler(0)
    with profiler.op(Op.parse("F0.1")):  # timed without a range (one would cost ~0.1 ms per op)
        torch.ones(4).sum()
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu) as prof, profiler.op(Op.parse("B0.1")):
        torch.ones(4).sum()
    assert "B0.1" in {e.key for e in prof.key_averages()}
    assert [e.op for e in profiler.events] == ["F0.1", "B0.1"]


class _DeviceTimeline:
    """A stand-in for a GPU: its own timeline, which ops advance while the host returns at once."""

    def __init__(self) -> None:
        self.now, self.syncs = 0.0, 0

    def event(self) -> Any:
        timeline = self

        class Event:
            def record(self) -> None:
                self.t = timeline.now

            def elapsed_time(self, other: Any) -> float:
                return (other.t - self.t) * 1000.0

        return Event()

    def synchronize(self) -> None:
        self.syncs += 1


def test_a_device_clock_times_ops_on_the_device_timeline_not_the_hosts() -> None:
    assert device_clock(torch.device("cpu")) is None  # on CPU the host clock is the device's
    gpu = _DeviceTimeline()
    profiler = OpProfiler(0, clock=DeviceClock(gpu.event, gpu.synchronize))
    gpu.now = 5.0
    profiler.start_step()
    for name, work in (("F0.0", 0.25), ("B0.0", 0.5)):
        with profiler.op(Op.parse(name)):
            gpu.now += work  # the device runs the op's kernels; the host returns at once
    syncs = gpu.syncs
    assert [(e.op, e.start, e.end) for e in profiler.events] == [("F0.0", 0.0, 0.25), ("B0.0", 0.25, 0.75)]
    assert gpu.syncs == syncs + 1  # the marks are read with one synchronisation
    assert len(profiler.events) == 2 and gpu.syncs == syncs + 1  # and only once
