"""The messages of one step, derived from the plan's data flow: who sends what to whom, in which order.

Every dependency of :class:`~lightning_bigmac.schedule.DataFlow` is one of two things:

* a *kept* edge, ``F(s).j -> B(s).j`` or ``EF.j -> EB.j`` on one rank (split: ``F -> I -> W``,
  ``GI -> GW``): the backward reuses what its own forward saved, nothing moves;
* a *message*: the producer's result (activations forward, gradients backward) goes to the
  consumer, over the wire when they are on different ranks, through a local mailbox otherwise.

A consumer op has at most one message producer, so ``(rank, consumer op)`` names a message and
gives its tag. For NCCL's posting-order matching the receiver must read the messages from one
sender in that sender's order; :meth:`Routes.from_peer` lists them so, computed from the global
plan that every rank holds. A plan with frozen parts has fewer ops, hence fewer messages: no
gradient goes to a frozen encoder's owner, none from the generator when nothing upstream trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from lightning_bigmac.schedule import DataFlow, Op, Plan, stage_of
from lightning_bigmac.schedule.plan import EB, EF, GI, GW, B, F, G, I, W

__all__ = ["Message", "Routes"]

_KEPT = {(F, B), (EF, EB), (F, I), (I, W), (GI, GW)}
_FORWARD_OF = {B: F, I: F, EB: EF, G: G, GI: GI}
"""The op whose input a backward-side op sends gradients for (G and GI do both)."""
_KIND_CODE = {F: 0, B: 1, I: 1, EF: 2, EB: 3, G: 4, GI: 4}
"""Per kind of message consumer (W and GW read only what their rank kept); a plan has either B
and G or, split, I and GI, so the two share codes."""
_CODES = 5


@dataclass(frozen=True)
class Message:
    """One producer's result travelling to one consumer (pipeline ranks)."""

    src: int
    producer: Op
    dst: int
    consumer: Op
    tag: int


def _kept(src: tuple[int, Op], dst: tuple[int, Op]) -> bool:
    (r0, a), (r1, b) = src, dst
    return r0 == r1 and (a.kind, b.kind) in _KEPT and a.microbatch == b.microbatch and a.chunk == b.chunk


class Routes:
    """Messages of one plan, indexed for the executor of every rank."""

    def __init__(self, plan: Plan, flow: DataFlow | None = None):
        self.plan = plan
        self.flow = flow or DataFlow.of_plan(plan)

    def tag(self, rank: int, op: Op) -> int:
        """Unique tag of the message consumed by ``op`` on ``rank``: from (op kind, microbatch, stage)."""
        stage = stage_of(rank, op.chunk, self.plan.pp) if op.chunk >= 0 else 0
        return (op.microbatch * self.flow.num_stages + stage) * _CODES + _KIND_CODE[op.kind]

    def _message(self, src: tuple[int, Op], dst: tuple[int, Op]) -> Message:
        return Message(src[0], src[1], dst[0], dst[1], self.tag(*dst))

    def inputs(self, rank: int, op: Op) -> list[Message]:
        """Messages ``op`` on ``rank`` consumes (at most one)."""
        return self._by_op[0][(rank, op)]

    def outputs(self, rank: int, op: Op) -> list[Message]:
        """Messages ``op`` on ``rank`` produces, one per consumer."""
        return self._by_op[1][(rank, op)]

    @cached_property
    def _by_op(self) -> tuple[dict[tuple[int, Op], list[Message]], dict[tuple[int, Op], list[Message]]]:
        """Inputs and outputs of every op, computed once: the executor asks for them around every op."""
        inputs, outputs = {}, {}
        for rank, ops in enumerate(self.plan.ranks):
            for op in ops:
                me, flow = (rank, op), self.flow
                inputs[me] = [self._message(p, me) for p in flow.producers(rank, op) if not _kept(p, me)]
                outputs[me] = [self._message(me, c) for c in flow.consumers(rank, op) if not _kept(me, c)]
        return inputs, outputs

    def request(self, msg: Message) -> Message | None:
        """The message that ``msg`` answers with gradients, or None.

        A backward op's output message carries the gradients w.r.t. its forward's received input,
        one per leaf (``B(s+1).j -> B(s).j`` answers ``F(s).j -> F(s+1).j``, ``G.j -> B.j``
        answers ``F.j -> G.j``, ``B(0).j -> EB.j`` answers ``EF.j -> F(0).j``): the receiver
        knows their shapes from what it sent and can post its receives before they come.
        """
        kinds = (_FORWARD_OF.get(msg.producer.kind), _FORWARD_OF.get(msg.consumer.kind))
        if kinds[0] is None or kinds[1] is None:
            return None
        producer, consumer = msg.producer._replace(kind=kinds[0]), msg.consumer._replace(kind=kinds[1])
        for m in self.inputs(msg.src, producer):
            if m.src == msg.dst and m.producer == consumer:
                return m
        return None

    @cached_property
    def _sent(self) -> list[list[Message]]:
        """Per rank, the messages it sends to other ranks, in its program order."""
        return [
            [m for op in ops for m in self.outputs(rank, op) if m.dst != rank]
            for rank, ops in enumerate(self.plan.ranks)
        ]

    def from_peer(self, src: int, dst: int) -> list[Message]:
        """Messages ``src`` sends to ``dst`` in the order ``src`` posts them."""
        return [m for m in self._sent[src] if m.dst == dst]
