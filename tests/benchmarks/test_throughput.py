"""The throughput benchmark at tiny size: its baselines compute the model's loss, and count fairly."""

from __future__ import annotations

import pytest
import torch

from benchmarks.baselines.torch_pipelining import pad_step, stage_modules, step_targets
from benchmarks.throughput import SETUPS, Data, Workload, measure
from lightning_bigmac.testing.tiny_mllm import TinyMLLM

TINY = {"dim": 32, "heads": 2, "layers": 4}


def tiny_workload(**kwargs: int) -> Workload:
    fields = {"encoder_layers": 2, "patches": 4, "model": TINY, "token_cap": 64, "text": (4, 16)}
    return Workload(**{**fields, "steps": 2, "repeats": 2, **kwargs})


def test_stage_split_on_padded_step_computes_the_model_loss_and_gradients() -> None:
    """Stage 0 then stage 1 on the padded microbatches gives TinyMLLM's loss on the unpadded ones."""
    w = tiny_workload()
    data = Data.build(w)
    mbs = data.microbatches(data.naive[0])
    padded = pad_step(mbs)
    assert len({mb["tokens"].shape[0] for mb in mbs}) > 1, "the test needs uneven microbatches to pad"
    reference = TinyMLLM(w.config(), seed=0)
    expected = reference.reference_loss(mbs)
    expected.backward()

    model = TinyMLLM(w.config(), seed=0)
    first, last = stage_modules(model)
    targets = step_targets(model, mbs)
    total = torch.zeros(())
    for j, mb in enumerate(mbs):
        h = first(padded.images[j : j + 1], padded.tokens[j : j + 1], padded.counts[j : j + 1])
        assert h.shape[1] == padded.images.shape[1] * w.patches + padded.tokens.shape[1]  # fixed shape
        total = total + last.loss(last(h), mb, *targets)
    total.backward()
    torch.testing.assert_close(total, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.slow
def test_tiny_run_processes_the_same_samples_and_starts_from_the_same_loss() -> None:
    w = tiny_workload()
    res = measure(w, timeout=60.0)
    data = Data.build(w)
    assert len(set(res["samples"].values())) == 1  # every setup trains on every sample of the pass
    assert sorted(i for plan in res["balanced"] for mb in plan for i in mb) == sorted(
        i for step in res["naive"] for mb in step for i in mb
    )
    model = TinyMLLM(w.config(), seed=0)
    with torch.no_grad():
        naive = float(model.reference_loss(data.microbatches(res["naive"][0])))
        balanced = float(model.reference_loss(data.microbatches(res["balanced"][0])))
    first = res["first_loss"]
    assert first["megatron"] == pytest.approx(naive, rel=1e-5)
    assert first["torch_pipelining"] == pytest.approx(naive, rel=1e-5)
    assert first["bigmac"] == pytest.approx(balanced, rel=1e-5)
    assert 0.0 < res["shares"]["encoder"] < 1.0
    assert all(len(res["samples_per_s"][n]) == w.repeats and res["median"][n] > 0 for n in SETUPS)
