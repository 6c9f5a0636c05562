"""Frozen modules: every schedule drops the backward ops they make pointless, the validator proves the
plans, the simulator gives shorter steps and no frozen encoder memory, and the CLI and pictures say so."""

import dataclasses
import json

import pytest

from lightning_bigmac.cli import main
from lightning_bigmac.schedule import (
    SCHEDULES,
    DataFlow,
    Op,
    OpCosts,
    Plan,
    PlanError,
    ScheduleConfig,
    build_plan,
    simulate,
    validate,
)
from lightning_bigmac.schedule.orders import megatron_warmup
from lightning_bigmac.schedule.pictures import draw_gantt
from lightning_bigmac.schedule.plan import EB, EF, GI, GW, B, F, G, I, W

LAYOUTS = [(2, 1, 4), (2, 2, 8), (3, 1, 6), (4, 2, 8)]
FROZEN = [{"encoder"}, {"llm"}, {"generator"}, {"encoder", "llm"}, {"encoder", "llm", "generator"}]


def _cases():
    for schedule in SCHEDULES:
        for pp, vpp, m in LAYOUTS:
            if (schedule == "1f1b" and vpp > 1) or (schedule == "interleaved" and vpp < 2):
                continue
            yield schedule, pp, vpp, m


def dropped_kinds(frozen: set[str], split: bool) -> set[str]:
    """The op kinds a step with these frozen modules must not have (the rules of ``step_kinds``, restated)."""
    upstream_trains = not {"encoder", "llm"} <= frozen
    dropped = {EB} if "encoder" in frozen else set()
    if not upstream_trains:
        dropped |= {I, W} if split else {B}
    elif "llm" in frozen and split:
        dropped.add(W)
    if "generator" in frozen and split:
        dropped.add(GW)
    return dropped


@pytest.mark.parametrize(("schedule", "pp", "vpp", "m"), list(_cases()))
def test_every_schedule_drops_the_backward_of_frozen_modules_and_gets_shorter(schedule, pp, vpp, m):
    full = simulate(build_plan(schedule, pp=pp, vpp=vpp, microbatches=m))
    split = full.plan.split_backward
    for frozen in FROZEN:
        plan = build_plan(schedule, pp=pp, vpp=vpp, microbatches=m, frozen=frozen)
        sim = simulate(plan)  # validates again
        kinds = {op.kind for ops in plan.ranks for op in ops}
        dropped = dropped_kinds(frozen, split)
        assert plan.frozen == frozen and not kinds & dropped, (frozen, kinds)
        assert kinds | dropped == {op.kind for ops in full.plan.ranks for op in ops}, frozen
        assert sim.step_time < full.step_time, (frozen, sim.step_time, full.step_time)
        flow = DataFlow.of_plan(plan)
        last = (pp - 1, vpp - 1)  # (rank, chunk) of the last stage
        for r, ops in enumerate(plan.ranks):
            for op in ops:
                sent = {c.kind for _, c in flow.consumers(r, op)}
                if op.kind in (B, I) and (r, op.chunk) == (0, 0):  # stage 0's backward
                    assert (EB in sent) == ("encoder" not in frozen)
                if op.kind in (G, GI):  # a gradient to the last stage only if it runs a backward
                    grads = [(rank, c.chunk) for rank, c in flow.consumers(r, op) if c.kind in (B, I)]
                    assert grads == ([last] if B in kinds or I in kinds else []), (op, sent)
        if "encoder" in frozen:
            assert sim.peak_live["encoder"] == (0,) * pp
        else:
            assert sim.peak_live["encoder"] == full.peak_live["encoder"]
        if {"encoder", "llm"} <= frozen:
            assert sim.peak_live["llm"] == (0,) * pp


def test_a_frozen_llm_keeps_input_gradients_for_a_trainable_encoder():
    for schedule in ("bigmac", "bigmac_zb"):
        plan = build_plan(schedule, pp=2, microbatches=8, frozen={"llm"})
        kinds = {op.kind for ops in plan.ranks for op in ops}
        assert EB in kinds and (B in kinds or I in kinds)
        sim = simulate(plan)
        assert max(sim.peak_live["llm"]) > 0  # the forwards keep what the input gradients need


def test_split_step_frees_a_frozen_llms_units_at_i_and_a_frozen_generators_at_gi():
    pp, m = 4, 16
    full = simulate(build_plan("bigmac_zb", pp=pp, microbatches=m))
    llm = simulate(build_plan("bigmac_zb", pp=pp, microbatches=m, frozen={"llm"}, weight_deferral=0))
    gen = simulate(build_plan("bigmac_zb", pp=pp, microbatches=m, frozen={"generator"}))
    for r in range(pp):  # no W holds them: at most 1F1B's units
        assert llm.peak_live["llm"][r] <= megatron_warmup(r, pp, 1, m) + 1
    assert gen.peak_live["generator"] == (1,) * pp < full.peak_live["generator"]


def test_frozen_encoder_releases_its_columns_after_stage_zeros_forwards():
    plan = build_plan("bigmac", pp=4, microbatches=16, frozen={"encoder"}, encoder_warmup=1)
    stage0 = [op for op in plan.ranks[0] if op.kind in (EF, F, B)]
    # EF.4 (group 1) runs on rank 0 once stage 0 has run the forwards of group 0, before any backward
    assert stage0.index(Op(EF, 4)) > stage0.index(Op(F, 3, 0))
    assert stage0.index(Op(EF, 4)) < stage0.index(Op(B, 0, 0))


def test_validator_refuses_ops_that_frozen_modules_leave_nothing_to_compute():
    plan = build_plan("bigmac", pp=2, microbatches=4)
    with pytest.raises(PlanError, match=r"EB\.\d on rank \d step \d+: the plan says frozen=encoder"):
        validate(dataclasses.replace(plan, frozen=frozenset({"encoder"})))
    zb = build_plan("bigmac_zb", pp=2, microbatches=4)
    with pytest.raises(PlanError, match=r"GW\.\d on rank .*frozen=generator, which leaves nothing"):
        validate(dataclasses.replace(zb, frozen=frozenset({"generator"})))
    frozen = build_plan("bigmac", pp=2, microbatches=4, frozen={"encoder"})
    with pytest.raises(PlanError, match=r"incomplete plan: missing EB\.0"):  # a trainable encoder needs them
        validate(dataclasses.replace(frozen, frozen=frozenset()))


def test_plan_json_carries_the_frozen_set():
    plan = build_plan("bigmac_zb", pp=2, microbatches=4, frozen={"llm", "encoder"})
    data = json.loads(plan.to_json())
    assert data["frozen"] == ["encoder", "llm"]
    assert Plan.from_json(plan.to_json()) == plan
    assert "frozen" not in build_plan("bigmac", pp=2, microbatches=4).to_dict()
    with pytest.raises(ValueError, match="frozen=\\['vit'\\]: name modules among encoder, llm, generator"):
        Plan.from_dict({**data, "frozen": ["vit"]})


def test_config_reads_names_and_refuses_unknown_ones():
    assert ScheduleConfig(pp=2, microbatches=4, frozen="encoder, llm").frozen == {"encoder", "llm"}
    with pytest.raises(ValueError, match=r"frozen names \['vision'\]: name modules among encoder, llm"):
        ScheduleConfig(pp=2, microbatches=4, frozen=["vision"])


def test_costs_of_a_frozen_backward_are_its_input_half():
    costs = OpCosts(llm_backward=4.0, llm_weight_share=0.25, generator=3.0, generator_weight_share=1 / 3)
    assert costs.duration(0, Op(B, 0, 0)) == 4.0
    assert costs.duration(0, Op(B, 0, 0), frozenset({"llm"})) == 3.0 == costs.duration(0, Op(I, 0, 0))
    assert costs.duration(0, Op(G, 0), frozenset({"generator"})) == pytest.approx(2.0)
    assert costs.duration(0, Op(B, 0, 0), frozenset({"encoder"})) == 4.0


def test_a_profile_of_a_frozen_step_estimates_the_backwards_it_lacks():
    events = [
        {"rank": 0, "op": "EF.0", "start": 0.0, "end": 0.5},
        {"rank": 0, "op": "F0.0", "start": 0.5, "end": 0.75},
        {"rank": 0, "op": "G.0", "start": 0.75, "end": 1.5},
    ]
    costs = OpCosts.from_profile({"format": "bigmac-profile/1", "events": events})
    assert (costs.encoder_backward, costs.llm_backward) == (1.0, 0.5)  # twice the forwards


def test_cli_plans_with_frozen_modules_and_the_gantt_hatches_them(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["plan", "--schedule", "bigmac", "--pp", "2", "--microbatches", "8", "--json", str(out)]
    assert main([*args, "--frozen", "encoder,llm"]) == 0
    text = capsys.readouterr().out
    assert "encoder=yes generator=yes frozen=encoder,llm" in text
    data = json.loads(out.read_text())
    assert data["frozen"] == ["encoder", "llm"]
    assert data["simulation"]["peak_live"]["encoder"] == [0, 0] == data["simulation"]["peak_live"]["llm"]
    assert not any(op.startswith(("EB", "B")) for ops in data["ranks"] for op in ops)
    with pytest.raises(SystemExit, match="2"):
        main([*args, "--frozen", "vit"])
    assert "name modules among encoder, llm, generator" in capsys.readouterr().err
    svgs = {}
    for frozen in (frozenset(), frozenset({"encoder"})):
        path = draw_gantt(
            simulate(build_plan("bigmac", pp=2, microbatches=4, frozen=frozen)), tmp_path / "g.svg"
        )
        svgs[frozen] = path.read_text()
    assert "<pattern" in svgs[frozenset({"encoder"})] and "<pattern" not in svgs[frozenset()]
