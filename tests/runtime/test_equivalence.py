"""Gradient equivalence: every schedule on every layout matches a single-process reference exactly.

Tolerance: fp32, max |diff| <= 1e-5 x max |reference grad| per parameter, loss to 1e-5 relative.
Besides the seven schedules each layout runs text-only steps (no encoder, no generator),
image-only steps (no text targets), a bigmac_zb step without a generator and two forward-only
(evaluation) steps; P=4 also runs ideal, bigmac and bigmac_zb with messages paired by posting
order alone (NCCL's rule) instead of by tag.
"""

from __future__ import annotations

import pytest
import torch

from lightning_bigmac.testing.scenarios import case_config, case_microbatches
from lightning_bigmac.testing.tiny_mllm import TinyMLLM


def _reference(case: dict, dp: int) -> tuple[float, dict[str, torch.Tensor]]:
    model = TinyMLLM(case_config(case), seed=0)
    mbs = [mb for d in range(dp) for mb in case_microbatches(case, d)]
    multimodal = case.get("data", "mixed") != "text"
    loss = model.reference_loss(mbs, encoder=multimodal, generator=case.get("generator", multimodal))
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return float(loss.detach()), grads


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pp", "dp", "vpp"), [(2, 1, 1), (2, 1, 2), (4, 1, 1), (2, 2, 1)], ids=["P2", "P2V2", "P4", "P2xD2"]
)
def test_every_schedule_matches_single_process(run_layout, pp: int, dp: int, vpp: int) -> None:
    cases, results = run_layout(pp, dp, vpp)
    worst, checked = 0.0, 0
    for i, case in enumerate(cases):
        if case.get("measure", "grads") != "grads":
            continue
        checked += 1
        ref_loss, ref = _reference(case, dp)
        covered: set[str] = set()
        for rank, per_rank in enumerate(results):
            got = per_rank[i]
            assert got["loss"] == pytest.approx(ref_loss, rel=1e-5), (case, rank)
            if case.get("forward_only"):  # evaluation: the loss, and no gradient anywhere
                assert all(float(g.abs().max()) == 0 for g in got["grads"].values()), case
                continue
            for name, grad in got["grads"].items():
                scale = float(ref[name].abs().max())
                err = float((grad - ref[name]).abs().max())
                assert err <= 1e-5 * scale + 1e-12, f"{case} rank {rank} {name}: |diff| {err} vs max {scale}"
                if scale > 0:
                    worst = max(worst, err / scale)
                covered.add(name)
        if not case.get("forward_only"):
            assert covered == set(ref), f"{case}: parameters with no owner: {sorted(set(ref) - covered)}"
    print(f"pp={pp} dp={dp} vpp={vpp}: {checked} steps, worst relative gradient error {worst:.2e}")
