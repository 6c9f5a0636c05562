"""Profiler exports: a Chrome trace of every op, and a cost file from which the simulator predicts
the profiled run's step time (op ends measured from the step's start barrier) within 15%."""

from __future__ import annotations

import json
import statistics

import pytest

from lightning_bigmac.runtime import chrome_trace, cost_profile
from lightning_bigmac.schedule import CostModel, Plan, simulate


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
            predicted = simulate(plan, CostModel.load(path)).step_time
            measured = max(e.end for e in rec["events"])
            errors.append(abs(predicted / measured - 1))
        print(plan.schedule, "profile -> simulate errors per step:", [f"{e:.3f}" for e in errors])
        assert statistics.median(errors) <= 0.15, errors
