"""The paper's claims as properties of our plans: O(1) encoder/generator memory, ideal step time,
the figure's structure, and the LLM schedule unchanged but for one group of warm-up."""

import pytest

from lightning_bigmac.schedule import OpCosts, build_plan, simulate
from lightning_bigmac.schedule.orders import megatron_warmup


@pytest.mark.parametrize("vpp", [1, 2, 3])
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_bigmac_encoder_and_generator_memory_is_flat_in_m_while_ideal_grows(pp, vpp):
    small = simulate(build_plan("bigmac", pp=pp, vpp=vpp, microbatches=4 * pp))
    large = simulate(build_plan("bigmac", pp=pp, vpp=vpp, microbatches=16 * pp))
    for sim in (small, large):
        w = sim.plan.knobs["encoder_warmup"]
        assert max(sim.peak_live["encoder"]) <= w
        assert max(sim.peak_live["generator"]) <= 1
    assert small.peak_live["encoder"] == large.peak_live["encoder"]
    assert small.peak_live["generator"] == large.peak_live["generator"]

    ideal_small = simulate(build_plan("ideal", pp=pp, vpp=vpp, microbatches=4 * pp))
    ideal_large = simulate(build_plan("ideal", pp=pp, vpp=vpp, microbatches=16 * pp))
    growth = max(ideal_large.peak_live["encoder"]) / max(ideal_small.peak_live["encoder"])
    assert growth >= 3


@pytest.mark.parametrize("llm_warmup", ["auto", "group", "minimal"])
@pytest.mark.parametrize(("pp", "vpp"), [(2, 1), (4, 1), (4, 2), (8, 2), (3, 3)])
def test_bigmac_llm_memory_is_megatrons_plus_at_most_one_group(pp, vpp, llm_warmup):
    m = 8 * pp
    bigmac = simulate(build_plan("bigmac", pp=pp, vpp=vpp, microbatches=m, llm_warmup=llm_warmup))
    megatron = simulate(build_plan("megatron", pp=pp, vpp=vpp, microbatches=m))
    for r in range(pp):
        assert megatron.peak_live["llm"][r] == megatron_warmup(r, pp, vpp, m) + 1
        assert bigmac.peak_live["llm"][r] <= megatron.peak_live["llm"][r] + pp


@pytest.mark.parametrize("generator", [True, False])
@pytest.mark.parametrize("k", [8, 16])
@pytest.mark.parametrize(("pp", "vpp"), [(2, 1), (4, 1), (4, 2), (8, 1), (8, 2), (3, 3)])
def test_bigmac_with_balanced_columns_is_within_2_percent_of_ideal(pp, vpp, k, generator):
    costs = OpCosts(encoder_forward=2.0, encoder_backward=4.0, generator=3.0, latency=0.1)
    bigmac = simulate(
        build_plan("bigmac", pp=pp, vpp=vpp, microbatches=k * pp, generator=generator, costs=costs), costs
    )
    ideal = simulate(
        build_plan("ideal", pp=pp, vpp=vpp, microbatches=k * pp, generator=generator, costs=costs), costs
    )
    assert bigmac.step_time <= 1.02 * ideal.step_time
    assert bigmac.step_time >= bigmac.lower_bound


@pytest.mark.parametrize(("pp", "vpp"), [(2, 1), (4, 1), (4, 2), (8, 2)])
def test_megatron_is_slower_than_bigmac_when_the_encoder_is_a_fifth_of_the_work(pp, vpp, capsys):
    m = 8 * pp
    # per microbatch: LLM 3 units per chunk over pp*vpp chunks; encoder share = enc / (enc + llm + gen)
    llm = 3.0 * pp * vpp
    enc = 0.25 * llm  # 20% of the total with no generator
    costs = OpCosts(encoder_forward=enc / 3, encoder_backward=2 * enc / 3)
    share = enc / (enc + llm)
    assert share == pytest.approx(0.2)
    bigmac = simulate(
        build_plan("bigmac", pp=pp, vpp=vpp, microbatches=m, generator=False, costs=costs), costs
    )
    megatron = simulate(build_plan("megatron", pp=pp, vpp=vpp, microbatches=m, generator=False), costs)
    ratio = megatron.step_time / bigmac.step_time
    with capsys.disabled():
        print(
            f"\n  encoder share {share:.0%}, pp={pp} vpp={vpp} M={m}: "
            f"megatron / bigmac step time = {ratio:.3f}"
        )
    assert ratio > 1.0


def test_paper_knobs_reproduce_the_figure():
    """P=4, V=2, M=64, W=3, one extra warm-up group: the bullets of paper_figure_schedule.md."""
    plan = build_plan("bigmac", pp=4, vpp=2, microbatches=64, encoder_warmup=3, llm_warmup="group")
    rows = [list(map(str, ops)) for ops in plan.ranks]
    for r, ops in enumerate(rows):
        assert ops[:3] == [f"EF.{r}", f"EF.{r + 4}", f"EF.{r + 8}"]  # three encoder groups first
        assert ops[3].startswith("F")  # then the LLM
    assert plan.warmup_forwards() == [15, 13, 11, 9]
    last = rows[3]
    assert last[last.index("F1.3") + 1] == "G.3"  # `F3 [G3]` on PP3
    first = rows[0]
    i = first.index("B0.3")
    assert first[i : i + 3] == ["B0.3", "EB.0", "EF.12"]  # `b3 [EB0][EF12]` on PP0
    # group g's generator column follows the last stage's forward of the group's last microbatch
    for g in range(16):
        assert last[last.index(f"F1.{4 * g + 3}") + 1] == f"G.{4 * g + 3}"
    # the last three encoder-backward columns have no forward after them; the last is a tail
    for r, ops in enumerate(rows):
        assert ops[-1] == f"EB.{60 + r}"
        last_ef = max(i for i, o in enumerate(ops) if o.startswith("EF"))
        assert last_ef < ops.index(f"EB.{52 + r}")
    # LLM order is Megatron's, only delayed: same order as interleaved 1F1B with 4 more warm-up forwards
    from lightning_bigmac.schedule.orders import one_f_one_b_order

    for r, ops in enumerate(plan.ranks):
        assert [o for o in ops if o.kind in "FB"] == one_f_one_b_order(r, 4, 2, 64, extra_warmup=4)


def test_default_knobs_for_the_papers_setting():
    """Reported in the README next to the paper's: W=3 and one group minus one of extra warm-up."""
    plan = build_plan("bigmac", pp=4, vpp=2, microbatches=64)
    sim = simulate(plan)
    assert plan.knobs["encoder_warmup"] == 3 and plan.knobs["llm_warmup"] == [3, 3, 3, 3]
    assert plan.warmup_forwards() == [14, 12, 10, 8]
    assert sim.peak_live == {"encoder": (3, 3, 3, 3), "llm": (14, 12, 10, 8), "generator": (1, 1, 1, 1)}
    ideal = simulate(build_plan("ideal", pp=4, vpp=2, microbatches=64))
    assert sim.step_time <= 1.02 * ideal.step_time
