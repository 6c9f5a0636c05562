"""Every builder's plans validate across a grid of P, V, M; config errors name the fix."""

import itertools
from dataclasses import replace

import pytest

from lightning_bigmac.schedule import (
    SCHEDULES,
    OpCosts,
    Plan,
    PlanError,
    ScheduleConfig,
    build_plan,
    simulate,
    validate,
)

GRID_M = (1, 2, 3, 4, 8, 16)  # multiples of P


def _grid():
    for p, v, k, gen, schedule in itertools.product(
        (2, 3, 4, 8), (1, 2, 3), GRID_M, (True, False), SCHEDULES
    ):
        if (schedule == "1f1b" and v > 1) or (schedule == "interleaved" and v == 1):
            continue
        if schedule in ("gpipe", "megatron") and v > 1 and k > 4:
            continue  # the same order at larger M; keeps the grid fast
        if p == 8 and k > 8:
            continue
        yield p, v, k * p, gen, schedule


@pytest.mark.parametrize(("pp", "vpp", "m", "generator", "schedule"), list(_grid()))
def test_every_builder_validates_on_the_grid(pp, vpp, m, generator, schedule):
    plan = build_plan(schedule, pp=pp, vpp=vpp, microbatches=m, generator=generator)
    validate(plan)  # build_plan validates too; this keeps the check explicit
    split = plan.split_backward  # I and W for B, GI and GW for G
    expected_llm = (3 if split else 2) * vpp * m
    for ops in plan.ranks:
        assert sum(op.module == "llm" for op in ops) == expected_llm
    modules = [str(op) for ops in plan.ranks for op in ops if op.module != "llm"]
    assert len(modules) == len(set(modules)) == m * (2 + generator * (1 + split))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "megatron"])
@pytest.mark.parametrize("m", [1, 3, 5, 7])
def test_schedules_without_groups_take_any_microbatch_count(schedule, m):
    validate(build_plan(schedule, pp=4, microbatches=m))


@pytest.mark.parametrize(
    ("encoder", "generator"), [(True, True), (True, False), (False, True), (False, False)]
)
@pytest.mark.parametrize("vpp", [1, 2])
def test_bigmac_text_only_encoder_only_and_generator_only_steps(encoder, generator, vpp):
    plan = build_plan("bigmac", pp=4, vpp=vpp, microbatches=16, encoder=encoder, generator=generator)
    kinds = {op.kind for ops in plan.ranks for op in ops}
    assert ("EF" in kinds) == encoder and ("G" in kinds) == generator
    if not generator:
        assert plan.knobs["llm_warmup"] == [0] * 4  # nothing to wait for: Megatron's own warm-up


def test_explicit_owner_map_is_honoured():
    owners = [3, 2, 1, 0] * 2 + [0, 1, 2, 3] * 2
    plan = build_plan("bigmac", pp=4, vpp=2, microbatches=16, owners=owners)
    assert plan.owners("encoder") == owners and plan.owners("generator") == owners


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"schedule": "zigzag"}, r"unknown schedule 'zigzag'; choose one of gpipe, 1f1b"),
        ({"schedule": "1f1b", "vpp": 2}, "use 'interleaved'"),
        ({"schedule": "interleaved", "vpp": 1}, "needs vpp >= 2"),
        ({"microbatches": 10}, "microbatches=10 is not a multiple of pp=4.*use 8 or 12"),
        ({"schedule": "megatron", "vpp": 2, "microbatches": 6}, "not a multiple of pp=4"),
        ({"pp": 0}, "pp must be >= 1"),
        ({"owners": [0, 1, 2, 3, 0, 1, 2, 2]}, r"owners of group 1 \(microbatches 4..7\) are \[0, 1, 2, 2\]"),
        ({"owners": [0, 1, 2, 3]}, "owners has 4 entries but microbatches=8"),
        ({"schedule": "megatron", "encoder_warmup": 2}, "encoder_warmup applies to the 'ideal' and 'bigmac'"),
        ({"encoder_warmup": 3}, "between 1 and the number of groups"),
        ({"llm_warmup": "lots"}, "use 'auto', 'minimal', 'group'"),
        ({"llm_warmup": [1, 2]}, "one extension >= 0 per rank"),
    ],
)
def test_bad_configs_name_the_field_and_the_fix(fields, match):
    base = {"schedule": "bigmac", "pp": 4, "microbatches": 8}
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**{**base, **fields})


def test_unsafe_user_knobs_name_the_smallest_safe_value():
    with pytest.raises(ValueError, match=r"encoder_warmup=2 deadlocks.*smallest safe value is 3"):
        build_plan("bigmac", pp=4, vpp=2, microbatches=32, encoder_warmup=2)
    with pytest.raises(
        ValueError, match=r"llm_warmup=1.*deadlocks.*smallest safe extension is \[0, 0, 1, 3\]"
    ):
        build_plan("bigmac", pp=4, vpp=2, microbatches=32, llm_warmup=1)
    with pytest.raises(ValueError, match="smallest safe extension"):
        build_plan("ideal", pp=4, vpp=2, microbatches=32, llm_warmup=[0, 0, 0, 0])


def test_cost_arrays_must_cover_every_microbatch():
    with pytest.raises(ValueError, match="encoder_forward has 3 values but the plan has 8 microbatches"):
        build_plan("bigmac", pp=4, microbatches=8, costs=OpCosts(encoder_forward=[1.0, 2.0, 3.0]))


def test_llm_order_never_depends_on_costs():
    """Costs move columns, never the relative order of a rank's LLM ops."""
    cheap = build_plan("bigmac", pp=4, vpp=2, microbatches=32, encoder_warmup=3)
    costs = OpCosts(encoder_forward=[1.0 + (j % 5) for j in range(32)], generator=7.0)
    heavy = build_plan("bigmac", pp=4, vpp=2, microbatches=32, encoder_warmup=3, costs=costs)
    for a, b in zip(cheap.ranks, heavy.ranks, strict=True):
        assert [o for o in a if o.kind in "FB"] == [o for o in b if o.kind in "FB"]
    assert cheap.ranks != heavy.ranks  # but the columns moved
    assert simulate(heavy, costs).step_time > simulate(cheap).step_time


def test_auto_warms_the_first_stage_up_further_to_hide_transfer_latency():
    """With latency in the costs, one more forward in flight on stage 0 takes both round trips of
    every microbatch off the critical path at P=2; without latency the plan stays as it was."""
    costs = OpCosts(encoder_forward=0.25, encoder_backward=0.5, generator=0.15, latency=0.05)
    plain = build_plan("bigmac", pp=2, microbatches=32)
    hiding = build_plan("bigmac", pp=2, microbatches=32, costs=costs)
    assert plain.knobs["llm_warmup"] == [2, 2] and hiding.knobs["llm_warmup"] == [3, 2]
    assert simulate(hiding, costs).step_time < 0.99 * simulate(plain, costs).step_time
    assert build_plan("bigmac", pp=2, microbatches=32, costs=replace(costs, latency=0.0)).ranks == plain.ranks


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("encoder", "generator"), [(True, True), (False, False), (True, False)])
def test_forward_only_plans_have_no_backwards_and_keep_nothing(schedule, encoder, generator):
    vpp = 1 if schedule == "1f1b" else 2
    plan = build_plan(
        schedule, pp=4, vpp=vpp, microbatches=8, encoder=encoder, generator=generator, forward_only=True
    )
    kinds = {op.kind for ops in plan.ranks for op in ops}
    assert kinds == {"F"} | ({"EF"} if encoder else set()) | ({"G"} if generator else set())
    assert all(sum(op.kind == "F" for op in ops) == 8 * vpp for ops in plan.ranks)
    sim = simulate(plan)
    assert sim.peak_live == {"encoder": (0,) * 4, "llm": (0,) * 4, "generator": (0,) * 4}
    assert Plan.from_json(plan.to_json()) == plan


def test_a_backward_in_a_forward_only_plan_is_rejected():
    plan = build_plan("gpipe", pp=1, microbatches=1, encoder=False, generator=False)
    with pytest.raises(PlanError, match="forward-only"):
        validate(Plan("hand", 1, 1, 1, plan.ranks, False, False, forward_only=True))
