"""bigmac_zb: the split backward's ops in the plan format, validator and costs; the builder's step time
against the bound, its memory caps, and their automatic choice."""

import pytest

from lightning_bigmac.schedule import Op, OpCosts, Plan, PlanError, build_plan, simulate, validate
from lightning_bigmac.schedule.orders import llm_sequence, megatron_warmup


@pytest.mark.parametrize(("vpp", "k", "target"), [(1, 4, 1.03), (1, 8, 1.02), (2, 4, 1.03), (2, 8, 1.02)])
def test_step_is_within_target_of_the_bound_and_beats_ideal(vpp, k, target):
    pp = 4
    zb = simulate(build_plan("bigmac_zb", pp=pp, vpp=vpp, microbatches=k * pp))
    ideal = simulate(build_plan("ideal", pp=pp, vpp=vpp, microbatches=k * pp))
    assert zb.step_time <= target * zb.lower_bound
    assert zb.step_time < ideal.step_time
    assert zb.lower_bound == ideal.lower_bound  # the split moves work, it adds none


@pytest.mark.parametrize(("pp", "vpp"), [(4, 1), (4, 2), (8, 2)])
def test_encoder_and_generator_memory_is_flat_in_m_and_llm_memory_bounded_by_bigmacs(pp, vpp):
    sims = [simulate(build_plan("bigmac_zb", pp=pp, vpp=vpp, microbatches=k * pp)) for k in (4, 32)]
    bigmac = simulate(build_plan("bigmac", pp=pp, vpp=vpp, microbatches=4 * pp))
    for module in ("encoder", "generator", "llm"):  # busiest rank: the caps do not depend on M
        assert max(sims[0].peak_live[module]) == max(sims[1].peak_live[module]), module
    held = sims[0].plan.knobs["held_columns"]
    assert held <= bigmac.plan.knobs["encoder_warmup"] == sims[0].plan.knobs["held_columns_max"]
    assert max(sims[0].peak_live["encoder"]) <= held and max(sims[0].peak_live["generator"]) <= held
    assert max(sims[0].peak_live["llm"]) <= max(bigmac.peak_live["llm"]) + pp


def test_user_caps_bound_the_memory():
    pp, m = 4, 16
    plan = build_plan("bigmac_zb", pp=pp, microbatches=m, held_columns=1, weight_deferral=0)
    sim = simulate(plan)
    assert plan.knobs == {"held_columns": 1, "weight_deferral": 0}
    assert max(sim.peak_live["encoder"]) == max(sim.peak_live["generator"]) == 1
    for r in range(pp):  # d = 0: no more LLM units than Megatron's 1F1B holds
        assert sim.peak_live["llm"][r] <= megatron_warmup(r, pp, 1, m) + 1
    roomy = simulate(build_plan("bigmac_zb", pp=pp, microbatches=m, held_columns=4, weight_deferral=pp))
    assert roomy.step_time < sim.step_time


def test_llm_ops_keep_megatrons_order_in_each_direction():
    plan = build_plan("bigmac_zb", pp=4, vpp=2, microbatches=16)
    for ops in plan.ranks:
        assert [o for o in ops if o.kind == "F"] == llm_sequence("F", 4, 2, 16)
        assert [o for o in ops if o.kind == "I"] == llm_sequence("I", 4, 2, 16)
        done = set()
        for op in ops:  # each weight-gradient op after its input-gradient op
            if op.kind == "W":
                assert op._replace(kind="I") in done
            done.add(op)


@pytest.mark.parametrize("vpp", [1, 2])
@pytest.mark.parametrize(("encoder", "generator"), [(True, False), (False, True), (False, False)])
def test_steps_without_encoder_or_generator(encoder, generator, vpp):
    fields = {"pp": 4, "vpp": vpp, "microbatches": 16, "encoder": encoder, "generator": generator}
    plan = build_plan("bigmac_zb", **fields)
    kinds = {op.kind for ops in plan.ranks for op in ops}
    assert kinds == {"F", "I", "W"} | ({"EF", "EB"} if encoder else set()) | (
        {"GI", "GW"} if generator else set()
    )
    sim, bigmac = simulate(plan), simulate(build_plan("bigmac", **fields))
    assert sim.step_time < bigmac.step_time
    # without encoder work the last rank has nothing to do before its first input: P - 1 forwards
    assert sim.step_time <= sim.lower_bound + 3 * OpCosts().llm_forward


def test_forward_only_steps_are_not_split():
    plan = build_plan("bigmac_zb", pp=4, microbatches=8, forward_only=True)
    assert not plan.split_backward
    assert {op.kind for ops in plan.ranks for op in ops} == {"F", "EF", "G"}


def test_split_ops_read_and_round_trip():
    assert [str(Op.parse(s)) for s in ("I1.5", "W0.12", "GI.3", "GW.3")] == ["I1.5", "W0.12", "GI.3", "GW.3"]
    assert Op.parse("W0.1").module == "llm" and Op.parse("GW.1").module == "generator"
    plan = build_plan("bigmac_zb", pp=2, microbatches=4)
    data = plan.to_dict()
    assert data["split_backward"] is True
    assert Plan.from_dict(data) == plan
    del data["split_backward"]  # inferred from the ops, like encoder and generator
    assert Plan.from_dict(data).split_backward
    assert "split_backward" not in build_plan("bigmac", pp=2, microbatches=4).to_dict()


def _hand(rows, **flags) -> Plan:
    return Plan("hand", 2, 1, 2, rows, encoder=False, generator=False, **flags)


_SPLIT = [
    ["F0.0", "F0.1", "I0.0", "W0.0", "I0.1", "W0.1"],
    ["F0.0", "I0.0", "F0.1", "I0.1", "W0.0", "W0.1"],
]


def test_validator_checks_the_split_ops():
    validate(_hand(_SPLIT, split_backward=True))
    with pytest.raises(PlanError, match=r"missing W0\.1 on rank 1"):
        validate(_hand([_SPLIT[0], _SPLIT[1][:-1]], split_backward=True))
    with pytest.raises(PlanError, match=r"deadlock.*W0.0@PP0"):  # a weight-gradient op before its I
        validate(_hand([["F0.0", "F0.1", "W0.0", "I0.0", "I0.1", "W0.1"], _SPLIT[1]], split_backward=True))
    with pytest.raises(PlanError, match="split_backward=False: its backward ops are B and G"):
        validate(_hand(_SPLIT))
    with pytest.raises(PlanError, match="split_backward=True: its backward ops are I and W, GI and GW"):
        whole = [["F0.0", "F0.1", "B0.0", "B0.1"], ["F0.0", "B0.0", "F0.1", "B0.1"]]
        validate(_hand(whole, split_backward=True))


def test_validator_keeps_a_generators_two_halves_on_one_rank():
    plan = build_plan("bigmac_zb", pp=2, microbatches=2, encoder=False)
    rows = [list(map(str, ops)) for ops in plan.ranks]
    owner = next(r for r, ops in enumerate(rows) if "GW.0" in ops)
    rows[owner].remove("GW.0")
    rows[1 - owner].append("GW.0")
    with pytest.raises(
        PlanError, match=r"GW\.0 is on rank \d but GI\.0 on rank \d: it reads what GI\.0 kept"
    ):
        validate(Plan("hand", 2, 1, 2, rows, encoder=False, split_backward=True))


def test_split_costs_default_and_come_from_a_profile():
    costs = OpCosts()
    assert [costs.duration(0, Op.parse(s)) for s in ("I0.0", "W0.0", "GI.0", "GW.0")] == [1.0, 1.0, 2.0, 1.0]
    events = [
        {"rank": 0, "op": "I0.0", "start": 0.0, "end": 3.0},
        {"rank": 0, "op": "W0.0", "start": 3.0, "end": 4.0},
        {"rank": 1, "op": "GI.0", "start": 0.0, "end": 2.0},
        {"rank": 1, "op": "GW.0", "start": 2.0, "end": 4.0},
    ]
    got = OpCosts.from_profile({"format": "bigmac-profile/1", "events": events}).typical()
    assert (got.llm_backward, got.llm_weight_share) == (4.0, 0.25)
    assert (got.generator, got.generator_weight_share) == (4.0, 0.5)
    assert got.duration(0, Op.parse("B0.3")) == 4.0  # a whole backward: both halves
