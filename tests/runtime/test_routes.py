"""Messages derived from the data flow: every transfer once, unique tags, and per-peer order that is
the sender's posting order (what NCCL's matching needs)."""

from __future__ import annotations

import pytest

from lightning_bigmac.runtime import Routes
from lightning_bigmac.schedule import SCHEDULES, DataFlow, build_plan
from lightning_bigmac.schedule.plan import LLM_KINDS

LAYOUTS = [(2, 1, 4), (2, 2, 8), (4, 1, 8), (4, 2, 16), (3, 1, 6)]
KEPT = {("F", "B"), ("EF", "EB"), ("F", "I"), ("I", "W"), ("GI", "GW")}
"""What a backward-side op reads from its own rank's earlier op (never sent)."""


def _plans():
    for pp, vpp, m in LAYOUTS:
        for schedule in SCHEDULES:
            if (schedule == "1f1b" and vpp > 1) or (schedule == "interleaved" and vpp == 1):
                continue
            for multimodal in (True, False):
                yield build_plan(
                    schedule, pp=pp, vpp=vpp, microbatches=m, encoder=multimodal, generator=multimodal
                )


@pytest.mark.parametrize("plan", list(_plans()), ids=lambda p: f"{p.schedule}-P{p.pp}V{p.vpp}-enc{p.encoder}")
def test_messages_cover_every_transfer_once_in_sender_order(plan) -> None:
    routes, flow = Routes(plan), DataFlow.of_plan(plan)
    received = []
    for rank, ops in enumerate(plan.ranks):
        for op in ops:
            inputs = routes.inputs(rank, op)
            assert len(inputs) <= 1, (rank, op, inputs)
            producers = flow.producers(rank, op)
            # only the forward -> backward edges on the same rank are kept, never sent
            kept = [p for p in producers if p[0] == rank and (p[1].kind, op.kind) in KEPT]
            assert len(inputs) + len(kept) == len(producers)
            received += [m for m in inputs if m.src != rank]
    tags = [(m.dst, m.tag) for m in received]
    assert len(set(tags)) == len(tags)
    for dst in range(plan.pp):
        for src in range(plan.pp):
            if src == dst:
                continue
            sent = routes.from_peer(src, dst)
            assert sorted(map(str, sent)) == sorted(str(m) for m in received if (m.src, m.dst) == (src, dst))
            # the sender posts in program order: producers' positions are increasing
            pos = {op: i for i, op in enumerate(plan.ranks[src])}
            assert [pos[m.producer] for m in sent] == sorted(pos[m.producer] for m in sent)
    for m in received:
        assert (m.consumer.kind in LLM_KINDS) or m.consumer.kind in ("EB", "G", "GI")


@pytest.mark.parametrize("plan", list(_plans()), ids=lambda p: f"{p.schedule}-P{p.pp}V{p.vpp}-enc{p.encoder}")
def test_every_gradient_message_answers_the_forward_message_it_returns(plan) -> None:
    routes = Routes(plan)
    for src in range(plan.pp):
        for dst in range(plan.pp):
            if src == dst:
                continue
            for msg in routes.from_peer(src, dst):
                request = routes.request(msg)
                if msg.consumer.kind in ("B", "I", "EB"):  # gradients travel back to the forward's sender
                    assert request is not None, msg
                    assert (request.src, request.dst) == (dst, src)
                    assert request.consumer.microbatch == msg.producer.microbatch
                    assert request in routes.from_peer(dst, src)
                else:
                    assert request is None, msg
