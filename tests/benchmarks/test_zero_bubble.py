"""zero_bubble.py at small sizes: the simulated comparison and its targets, the idle report, and one
short real alternation of bigmac and bigmac_zb on the example model."""

from __future__ import annotations

import pytest
import zero_bubble as bench

from lightning_bigmac.schedule import OpCosts


def test_default_costs_meet_the_targets_and_beat_ideal() -> None:
    rows = [bench.simulate_layout(4, v, m, "default", OpCosts()) for v in (1, 2) for m in (16, 32)]
    assert all(line.endswith(": met") for line in bench.check_targets(rows)), bench.check_targets(rows)
    for row in rows:
        assert row.over_bound("bigmac_zb") < row.over_bound("ideal") <= row.over_bound("megatron")
        assert row.peak("bigmac_zb", "llm") <= row.peak("bigmac", "llm") + row.pp


def test_idle_report_names_what_each_gap_waits_for() -> None:
    row = bench.simulate_layout(4, 1, 16, "default", OpCosts())
    lines = bench.idle_report(row.sims["bigmac_zb"])
    assert lines[0].startswith("idle per rank:")
    assert any("waits for" in line for line in lines[1:])


def test_split_costs_scale_with_the_stages() -> None:
    costs = OpCosts(llm_forward=2.0, llm_backward=4.0, encoder_forward=3.0, latency=0.5)
    got = bench.scaled(costs, 4, 2)  # 8 stages where the profile had 2
    assert (got.llm_forward, got.llm_backward, got.encoder_forward, got.latency) == (0.5, 1.0, 3.0, 0.5)


@pytest.mark.slow
def test_real_alternation_gives_equal_gradients_and_both_profiles() -> None:
    real = bench.real_run(microbatches=4, samples=1, steps=1, seed=0)
    assert real["grad_diff"] <= 1e-5
    for schedule in ("bigmac", "bigmac_zb"):
        assert real[schedule]["wall"] > 0 and len(real[schedule]["walls"]) == 1
    whole, split = bench.profiled_costs(real)
    assert 0 < split.llm_weight_share < 1 and split.llm_backward > 0
    assert whole.llm_backward == real["bigmac"]["costs"].llm_backward
