"""The throughput benchmark at tiny size: its baselines compute the model's loss, and count fairly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from balancer import Coefficients, Term
from benchmarks.baselines.torch_pipelining import even_split, pad_step, stage_modules, step_targets
from benchmarks.throughput import (
    NESTED,
    SETUPS,
    SPLIT_LAYOUTS,
    Calibration,
    Data,
    Workload,
    balance,
    measure,
    split_costs,
    split_point,
    step_costs,
    sweep,
)
from lightning_bigmac.schedule import Op
from lightning_bigmac.schedule.plan import F
from lightning_bigmac.testing.tiny_mllm import TinyMLLM

TINY = {"dim": 32, "heads": 2, "layers": 4}


def tiny_workload(**kwargs: int) -> Workload:
    fields = {"encoder_layers": 2, "patches": 4, "model": TINY, "token_cap": 64, "text": (4, 16)}
    return Workload(**{**fields, "microbatches": 8, "steps": 2, "repeats": 2, **kwargs})


@pytest.mark.parametrize("split", [1, 2, 3])
def test_stage_split_on_padded_step_computes_the_model_loss_and_gradients(split: int) -> None:
    """Stage 0 then stage 1 on the padded microbatches gives TinyMLLM's loss on the unpadded ones,
    whatever the split, and the encoder only ever sees the real images."""
    w = tiny_workload()
    data = Data.build(w)
    mbs = data.microbatches(data.naive[0])
    padded = pad_step(mbs)
    assert len({mb["tokens"].shape[0] for mb in mbs}) > 1, "the test needs uneven microbatches to pad"
    reference = TinyMLLM(w.config(), seed=0)
    expected = reference.reference_loss(mbs)
    expected.backward()

    model = TinyMLLM(w.config(), seed=0)
    seen: list[int] = []
    model.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0]["images"].shape[0]))
    first, last = stage_modules(model, split)
    assert len(first.blocks) == split and len(last.blocks) == TINY["layers"] - split
    targets = step_targets(model, mbs)
    total = torch.zeros(())
    for j, mb in enumerate(mbs):
        h = first(padded.images[j : j + 1], padded.tokens[j : j + 1], padded.counts[j : j + 1])
        assert h.shape[1] == padded.images.shape[1] * w.patches + padded.tokens.shape[1]  # fixed shape
        total = total + last.loss(last(h), mb, *targets)
    total.backward()
    assert seen == [mb["images"].shape[0] for mb in mbs]
    torch.testing.assert_close(total, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_split_costs_give_each_rank_its_share_of_the_blocks() -> None:
    w = tiny_workload()
    data = Data.build(w)
    cal = Calibration({}, Coefficients(), 0.0, [], ())
    costs = step_costs(data, cal, data.naive[0])
    cut = split_costs(costs, 1, w.blocks)
    for j, per_chunk in enumerate(costs.llm_forward):
        stage0, stage1 = (cut.duration(r, Op(F, j, 0)) for r in (0, 1))
        assert stage0 == pytest.approx(2 * per_chunk / 4) and stage1 == pytest.approx(2 * per_chunk * 3 / 4)
    even = split_costs(costs, even_split(w.blocks), w.blocks)
    assert even.duration(0, Op(F, 0, 0)) == pytest.approx(costs.llm_forward[0])


def test_sweep_tunes_the_split_away_from_stage_0_when_the_encoder_is_heavy() -> None:
    """With the encoder on stage 0 far costlier than the LLM, the best split moves blocks to stage 1,
    and the tuned split is never slower than the even one in simulation."""
    w = tiny_workload()
    data = Data.build(w)
    heavy = Coefficients(  # an encoder patch 10 LLM tokens' work, a negligible generator
        encoder_forward=Term(linear=10.0),
        encoder_backward=Term(linear=20.0),
        generator=Term(linear=0.01),
    )
    plans, left_out = balance(data, heavy, w)
    cal = Calibration({}, heavy, 0.0, plans, left_out)
    cal = replace(cal, sweep=sweep(data.without(left_out), cal, w))
    rates = cal.sweep
    for layout in SPLIT_LAYOUTS:
        tuned = split_point(f"{layout}_tuned", cal, w)
        assert tuned < even_split(w.blocks)
        assert rates[layout][tuned] == max(rates[layout].values()) >= rates[layout][even_split(w.blocks)]


@pytest.mark.slow
def test_tiny_run_trains_every_setup_on_the_same_samples_from_the_same_loss() -> None:
    w = tiny_workload()
    res = measure(w, timeout=120.0)
    cal = res["calibration"]
    data = Data.build(w).without(cal.left_out)
    passes = {name: sorted(i for step in res["steps"][name] for mb in step for i in mb) for name in SETUPS}
    assert all(samples == passes["bigmac"] for samples in passes.values())  # the same samples, once each
    assert len(passes["bigmac"]) == res["samples"] == data.pass_samples()
    model = TinyMLLM(w.config(), seed=0)
    with torch.no_grad():
        naive = float(model.reference_loss(data.microbatches(data.naive[0])))
        balanced = float(model.reference_loss(data.microbatches(res["steps"]["bigmac"][0])))
    for name in SETUPS:
        assert res["first_loss"][name] == pytest.approx(balanced if name in NESTED else naive, rel=1e-5), name
    for layout in SPLIT_LAYOUTS:  # the tuned split is at least as fast as the even one, in simulation
        rates = cal.sweep[layout]
        assert rates[split_point(f"{layout}_tuned", cal, w)] >= rates[even_split(w.blocks)]
        assert res["predicted"][f"{layout}_tuned"] >= res["predicted"][f"{layout}_even"]
    peaks = res["encoder_peak"]
    assert set(peaks) == {"bigmac", "ideal", "megatron_tuned", "megatron_even"}
    assert peaks["ideal"] >= peaks["bigmac"] > 0
    assert 0.0 < res["shares"]["encoder"] < 1.0
    assert all(len(res["samples_per_s"][n]) == w.repeats and res["median"][n] > 0 for n in SETUPS)
