"""The transport between two processes: any pytree crosses with its dtypes, shapes and grad flags,
inside gloo's envelope or after it; answers (gradients) come back without a header, a None
gradient as zeros; long headers continue in a second message."""

from __future__ import annotations

import pytest
import torch

from lightning_bigmac.testing.scenarios import exchange_messages, message_tree
from lightning_bigmac.testing.spawn import run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("match_by_order", "inline_bytes"),
    [(False, None), (False, 0), (True, None)],
    ids=["gloo-envelope", "header-only", "nccl-style"],
)
def test_pytrees_and_their_answers_cross_intact(match_by_order: bool, inline_bytes: int | None) -> None:
    sender, receiver = run(exchange_messages, 2, match_by_order, inline_bytes, timeout=60.0)
    sent, got = message_tree(), receiver["tree"]
    assert got.keys() == sent.keys() and got["none"] is None
    for key in ("h", "ids", "empty", "unused"):
        assert got[key].dtype == sent[key].dtype and got[key].equal(sent[key].detach())
        # float leaves that required grad arrive as fresh leaves of the receiver's graph
        assert got[key].requires_grad == sent[key].requires_grad and got[key].is_leaf
    assert got["nested"][0].dtype == torch.bfloat16 and got["nested"][0].equal(sent["nested"][0])
    assert [t.item() for t in receiver["wide"]] == list(range(300))
    assert receiver["big"].equal(torch.arange(70_000.0))

    # one entry per leaf of the request: h's gradient, zeros for the unused input's None,
    # None where the request's leaf did not require grad, an empty tensor for an empty one
    h, ids, empty, unused, none, nested = sender["answer"]
    assert h.equal(torch.full((2, 3), 7.0))
    assert unused.equal(torch.zeros(3))
    assert empty.shape == (0, 5)
    assert ids is None and none is None and nested is None
