"""The stage context (``PipelineParts.context``): built once per stage and microbatch, the same loss
and gradients as the one-process reference, and refused when it could hold state a rank would lose.

The model is the tiny MLLM whose LLM blocks rotate queries and keys with rotary tables from the
context (``TinyConfig(rotary=True)``); P=2 and P=2 x V=2 run in one spawn.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bigmac import PipelineParts, reference_loss
from lightning_bigmac.runtime.partition import partition, place
from lightning_bigmac.testing.contract_cases import context_steps
from lightning_bigmac.testing.scenarios import case_config, case_microbatches
from lightning_bigmac.testing.spawn import run
from lightning_bigmac.testing.tiny_mllm import RotaryContext, TinyConfig, TinyMLLM, make_microbatches

ROTARY = {"rotary": True}
CASES = [
    {"schedule": "bigmac", "microbatches": 4, "model": ROTARY},
    {"schedule": "bigmac_zb", "microbatches": 4, "model": ROTARY, "seed": 3},  # split backward
    {"schedule": "bigmac", "microbatches": 4, "model": ROTARY, "seed": 5, "forward_only": True},
]


def _reference(case: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model = TinyMLLM(case_config(case), seed=0)
    loss = model.reference_loss(case_microbatches(case, 0))
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_a_model_with_a_context_trains_through_the_pipeline_as_in_one_process() -> None:
    results = run(context_steps, 2, 2, [1, 2], CASES, timeout=60.0)
    rotary = TinyMLLM(TinyConfig(rotary=True), seed=0)
    plain = TinyMLLM(TinyConfig(), seed=0)
    mbs = case_microbatches(CASES[0], 0)
    with torch.no_grad():  # the rotary tables change the loss: the context is used
        assert float(rotary.reference_loss(mbs)) != pytest.approx(float(plain.reference_loss(mbs)), rel=1e-3)
    for i, case in enumerate(CASES):
        ref_loss, ref = _reference(case)
        for vpp in (1, 2):
            covered: set[str] = set()
            for rank in range(2):
                got = results[rank][vpp][i]
                assert got["loss"] == pytest.approx(ref_loss, rel=1e-5), (case, vpp, rank)
                # once per stage of the rank (V of them) and microbatch, forward-only or not
                assert got["calls"] == vpp * case["microbatches"], (case, vpp, rank)
                if case.get("forward_only"):
                    assert not got["grads"], case
                    continue
                for name, grad in got["grads"].items():
                    scale = float(ref[name].abs().max())
                    assert float((grad - ref[name]).abs().max()) <= 1e-5 * scale + 1e-12, (case, vpp, name)
                    covered.add(name)
            if not case.get("forward_only"):
                assert covered == set(ref), (case, vpp, sorted(set(ref) - covered))


def test_the_reference_builds_the_context_once_per_microbatch() -> None:
    model = TinyMLLM(TinyConfig(rotary=True), seed=0)
    assert model.context is not None
    reference_loss(model.parts(), make_microbatches(model.cfg, 3))
    assert model.context.calls == 3


def test_place_keeps_the_context_on_every_rank_out_of_the_stages() -> None:
    model = TinyMLLM(TinyConfig(rotary=True), seed=0)
    parts = model.parts()
    stages = place(parts, partition(parts, pp=2, vpp=2), rank=1)
    assert not model.context.inv_freq.is_meta and model.blocks[0].qkv.weight.is_meta
    assert all(stage.context is model.context for stage in stages)
    assert not any(isinstance(m, RotaryContext) for stage in stages for m in stage.modules())


def _parts(**kwargs: object) -> PipelineParts:
    return PipelineParts(embedding=nn.Embedding(4, 4), head=nn.Linear(4, 4), text_targets=len, **kwargs)


def test_a_context_with_trainable_parameters_is_refused() -> None:
    with pytest.raises(ValueError, match=r"context has trainable parameters \['weight'.*requires_grad_"):
        _parts(blocks=[nn.Linear(4, 4)], context=nn.Linear(4, 4))
    frozen = nn.Linear(4, 4).requires_grad_(False)
    assert _parts(blocks=[nn.Linear(4, 4)], context=frozen).context is frozen
    with pytest.raises(TypeError, match="context must be callable"):
        _parts(blocks=[nn.Linear(4, 4)], context=3)


class _WithRotary(nn.Module):
    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary
        self.proj = nn.Linear(4, 4)


def test_a_buffer_shared_between_the_context_and_a_block_is_refused() -> None:
    rotary = RotaryContext(TinyConfig())
    with pytest.raises(
        ValueError, match=r"module context \(RotaryContext\) is also blocks.0.rotary.*inv_freq"
    ):
        _parts(blocks=[_WithRotary(rotary)], context=rotary)
