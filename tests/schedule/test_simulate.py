"""The simulator: hand-checked timelines, lower bound, live activations, costs and profiles."""

import itertools
import json
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_bigmac.schedule import (
    SCHEDULES,
    Op,
    OpCosts,
    Plan,
    build_plan,
    lower_bound,
    simulate,
)


def test_two_stage_1f1b_timeline_by_hand():
    plan = build_plan("1f1b", pp=2, microbatches=2, encoder=False, generator=False)
    sim = simulate(plan, OpCosts(llm_forward=1.0, llm_backward=2.0, latency=0.5))
    # PP0: F0 [0,1]      F1 [1,2]      B0 [5,7]      B1 [8,10]   (each B waits for PP1's B + 0.5)
    # PP1: F0 [1.5,2.5]  B0 [2.5,4.5]  F1 [4.5,5.5]  B1 [5.5,7.5]
    spans = {(iv.rank, str(iv.op)): (iv.start, iv.end) for row in sim.intervals for iv in row}
    assert spans[(1, "F0.0")] == (1.5, 2.5)
    assert spans[(1, "F0.1")] == (4.5, 5.5)  # PP1 runs 1F1B: its F0.1 waits behind B0.0
    assert spans[(0, "B0.0")] == (5.0, 7.0)
    assert spans[(0, "B0.1")] == (8.0, 10.0)
    assert sim.step_time == 10.0
    assert sim.busy == (6.0, 6.0)
    assert sim.bubble_fraction == pytest.approx((0.4, 0.4))
    assert sim.lower_bound == 6.0
    assert sim.peak_live["llm"] == (2, 1)


def test_lower_bound_spreads_encoder_and_generator_work_evenly():
    plan = build_plan("megatron", pp=2, microbatches=4)
    costs = OpCosts(
        llm_forward=1.0, llm_backward=2.0, encoder_forward=1.0, encoder_backward=3.0, generator=2.0
    )
    # LLM per rank: 4 * 3 = 12; encoder + generator: 4 * (4 + 2) = 24, spread over 2 ranks.
    assert lower_bound(plan, costs) == 12 + 12
    assert simulate(plan, costs).step_time > lower_bound(plan, costs)  # embedded layout: stragglers


def test_peak_bytes_follow_per_microbatch_sizes():
    m = 8
    costs = OpCosts(encoder_bytes=[100.0 * (j + 1) for j in range(m)], llm_bytes=10.0, generator_bytes=7.0)
    sim = simulate(build_plan("ideal", pp=2, microbatches=m), costs)
    assert sim.peak_bytes["encoder"] == (100.0 * (1 + 3 + 5 + 7), 100.0 * (2 + 4 + 6 + 8))  # all EF first
    assert sim.peak_bytes["generator"] == (7.0, 7.0)
    assert sim.peak_bytes["llm"] == tuple(10.0 * n for n in sim.peak_live["llm"])
    assert simulate(build_plan("ideal", pp=2, microbatches=m)).peak_bytes is None


def test_live_over_time_matches_peaks():
    sim = simulate(build_plan("bigmac", pp=4, vpp=2, microbatches=32))
    for module in ("encoder", "llm", "generator"):
        for r, (times, counts) in enumerate(sim.live_over_time(module)):
            assert times == sorted(times) and counts[-1] == 0
            assert max(counts) == sim.peak_live[module][r]


def _profile(plan, sim):
    events = [
        {"rank": iv.rank, "op": str(iv.op), "start": iv.start, "end": iv.end}
        for row in sim.intervals
        for iv in row
    ]
    return {"format": "bigmac-profile/1", "pp": plan.pp, "vpp": plan.vpp, "microbatches": plan.microbatches,
            "latency": sim.costs.latency, "events": events}  # fmt: skip


def test_profile_round_trip_reproduces_the_step(tmp_path):
    m = 16
    truth = OpCosts(
        encoder_forward=[0.5 + 0.1 * j for j in range(m)], llm_forward=[1.0 + 0.05 * j for j in range(m)],
        generator=2.5, latency=0.2,
    )  # fmt: skip
    plan = build_plan("bigmac", pp=4, vpp=2, microbatches=m, costs=truth)
    sim = simulate(plan, truth)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile(plan, sim)))
    loaded = OpCosts.load(path)
    assert loaded.latency == 0.2 and len(loaded.measured) == plan.num_ops()  # every op measured
    assert simulate(plan, loaded).step_time == pytest.approx(sim.step_time)
    # the same measurements predict another schedule of the same step
    other = build_plan("ideal", pp=4, vpp=2, microbatches=m)
    assert simulate(other, loaded).step_time == pytest.approx(simulate(other, truth).step_time)
    # for planning another step: one mean per kind, the latency kept, no per-op durations
    typical = loaded.typical()
    assert not typical.measured and typical.latency == 0.2
    assert typical.llm_forward == pytest.approx(statistics.fmean(truth.llm_forward))
    assert typical.duration(0, Op.parse("F0.5")) == typical.llm_forward


def test_cost_file_of_fields(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"encoder_forward": [1, 2, 3, 4], "latency": 0.1}))
    costs = OpCosts.load(path)
    assert costs.duration(0, build_plan("bigmac", pp=2, microbatches=4).ranks[1][0]) == 2
    path.write_text(json.dumps({"encoder_fwd": 1}))
    with pytest.raises(ValueError, match=r"unknown cost field\(s\) \['encoder_fwd'\]"):
        OpCosts.load(path)
    with pytest.raises(ValueError, match="not a bigmac-profile/1 file"):
        OpCosts.from_profile({"format": "other", "events": []})


# ---- properties --------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    pp = draw(st.integers(1, 6))
    vpp = draw(st.integers(1, 3))
    m = pp * draw(st.integers(1, 6))
    schedule = draw(st.sampled_from(SCHEDULES))
    if schedule == "1f1b":
        vpp = 1
    if schedule == "interleaved":
        vpp = max(vpp, 2)
    positive = st.floats(0.01, 10.0, allow_nan=False)
    costs = OpCosts(
        encoder_forward=draw(st.lists(positive, min_size=m, max_size=m)),
        encoder_backward=draw(st.lists(positive, min_size=m, max_size=m)),
        llm_forward=draw(st.lists(positive, min_size=m, max_size=m)),
        llm_backward=draw(st.lists(positive, min_size=m, max_size=m)),
        generator=draw(st.lists(positive, min_size=m, max_size=m)),
        latency=draw(st.floats(0.0, 1.0)),
    )
    encoder, generator = draw(st.booleans()), draw(st.booleans())
    return schedule, pp, vpp, m, encoder, generator, costs


@settings(max_examples=150, deadline=None)
@given(_cases())
def test_random_plans_are_complete_valid_and_no_faster_than_the_bound(case):
    schedule, pp, vpp, m, encoder, generator, costs = case
    plan = build_plan(
        schedule, pp=pp, vpp=vpp, microbatches=m, encoder=encoder, generator=generator, costs=costs
    )
    sim = simulate(plan, costs)
    assert sim.step_time >= sim.lower_bound - 1e-9
    # every op once: LLM ops once per rank, module ops once per step
    split = plan.split_backward  # I and W for B, GI and GW for G
    for ops in plan.ranks:
        llm = [op for op in ops if op.module == "llm"]
        assert len(llm) == len(set(llm)) == (3 if split else 2) * vpp * m
    modules = [op for ops in plan.ranks for op in ops if op.module != "llm"]
    assert len(modules) == len(set(modules)) == m * (2 * encoder + generator * (1 + split))
    assert Plan.from_json(plan.to_json()) == plan
    # ops on one rank never overlap in time and follow program order
    for row in sim.intervals:
        for a, b in itertools.pairwise(row):
            assert a.end <= b.start + 1e-9
