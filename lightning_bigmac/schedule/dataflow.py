"""Which op feeds which: the data dependencies of one step, written once.

The validator builds its graph from these rules, the simulator and the builders wait on them,
and the runtime derives its sends and receives from them. Nothing else in the project may
restate a dependency.

A *placed op* is ``(rank, op)``. Stage ``s = chunk * pp + rank``; stage 0 merges the encoder
outputs, the last stage ``pp * vpp - 1`` produces the hidden states the generator consumes and
computes the text loss. Per microbatch ``j`` the chain is::

    EF.j -> F(stage 0) -> ... -> F(last) -> G.j -> B(last) -> ... -> B(stage 0) -> EB.j

plus ``F(s).j -> B(s).j`` on every stage (saved activations) and ``EF.j -> EB.j`` on the owner.
A split backward (``I``/``W``, ``GI``/``GW``) runs the same chain with ``GI`` for ``G`` and ``I``
for ``B``; each weight-gradient op reads only what its own rank kept: ``I(s).j -> W(s).j`` and
``GI.j -> GW.j``. Frozen modules drop ops (:func:`~lightning_bigmac.schedule.plan.step_kinds`), never
a rule: an op that is not in the step has no consumer, so nothing is sent to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from .plan import EB, EF, GI, GW, G, Op, Plan, StepKinds, step_kinds, step_ops
from .plan import B as B_
from .plan import F as F_
from .plan import I as I_
from .plan import W as W_

__all__ = ["DataFlow", "PlacedOp", "stage_of"]

PlacedOp = tuple[int, Op]


def stage_of(rank: int, chunk: int, pp: int) -> int:
    """Global stage index of ``chunk`` on ``rank`` (Megatron's interleaved layout)."""
    return chunk * pp + rank


@dataclass(frozen=True)
class DataFlow:
    """Dependency rules for one pipeline of ``pp`` ranks x ``vpp`` chunks and its module owners.

    ``encoder_owner[j]`` / ``generator_owner[j]`` are the ranks that run microbatch ``j``'s
    encoder and generator work (ignored when that module is absent from the step). ``frozen``
    names the modules without a trainable parameter, as :attr:`Plan.frozen` does.
    """

    pp: int
    vpp: int
    microbatches: int
    encoder: bool
    generator: bool
    encoder_owner: tuple[int, ...]
    generator_owner: tuple[int, ...]
    forward_only: bool = False
    split_backward: bool = False
    frozen: frozenset[str] = frozenset()

    @classmethod
    def of_plan(cls, plan: Plan) -> DataFlow:
        """Rules for a plan, with owners read from where its EF and G ops are placed."""

        def owners(module: str) -> tuple[int, ...]:
            return tuple(-1 if r is None else r for r in plan.owners(module))

        return cls(
            plan.pp, plan.vpp, plan.microbatches, plan.encoder, plan.generator,
            owners("encoder"), owners("generator"), plan.forward_only, plan.split_backward, plan.frozen,
        )  # fmt: skip

    @property
    def kinds(self) -> StepKinds:
        """The op kinds of the step (:func:`~lightning_bigmac.schedule.plan.step_kinds`)."""
        return step_kinds(self.encoder, self.generator, self.forward_only, self.split_backward, self.frozen)

    @property
    def num_stages(self) -> int:
        return self.pp * self.vpp

    def _llm(self, kind: str, stage: int, mb: int) -> PlacedOp:
        return (stage % self.pp, Op(kind, mb, stage // self.pp))

    def producers(self, rank: int, op: Op) -> tuple[PlacedOp, ...]:
        """The placed ops whose results ``op`` on ``rank`` consumes."""
        kind, j = op.kind, op.microbatch
        back, gen = (I_, GI) if self.split_backward else (B_, G)
        if kind == F_:
            s = stage_of(rank, op.chunk, self.pp)
            if s > 0:
                return (self._llm(F_, s - 1, j),)
            return ((self.encoder_owner[j], Op(EF, j)),) if self.encoder else ()
        if kind in (B_, I_):
            s = stage_of(rank, op.chunk, self.pp)
            own = (rank, Op(F_, j, op.chunk))
            if s < self.num_stages - 1:
                return (self._llm(back, s + 1, j), own)
            if self.generator:
                return ((self.generator_owner[j], Op(gen, j)), own)
            return (own,)
        if kind == W_:
            return ((rank, Op(I_, j, op.chunk)),)
        if kind in (G, GI):
            return (self._llm(F_, self.num_stages - 1, j),)
        if kind == GW:
            return ((self.generator_owner[j], Op(GI, j)),)
        if kind == EB:
            return (self._llm(back, 0, j), (self.encoder_owner[j], Op(EF, j)))
        return ()  # EF reads only the data loader

    @cached_property
    def _consumers(self) -> dict[PlacedOp, tuple[PlacedOp, ...]]:
        out: dict[PlacedOp, list[PlacedOp]] = {}
        for placed in self.all_ops():
            for src in self.producers(*placed):
                out.setdefault(src, []).append(placed)
        return {k: tuple(v) for k, v in out.items()}

    def consumers(self, rank: int, op: Op) -> tuple[PlacedOp, ...]:
        """The placed ops that consume ``op``'s result (the inverse of :meth:`producers`)."""
        return self._consumers.get((rank, op), ())

    def all_ops(self) -> list[PlacedOp]:
        """Every placed op a complete step must contain, each exactly once."""
        enc, gen = self.encoder_owner, self.generator_owner
        owner = {EF: enc, EB: enc, G: gen, GI: gen, GW: gen}
        ops = step_ops(self.pp, self.vpp, self.microbatches, self.kinds.run)
        return [(owner[op.kind][op.microbatch] if r < 0 else r, op) for r, op in ops]


def default_owners(microbatches: int, pp: int) -> tuple[int, ...]:
    """Microbatch ``j``'s encoder/generator work runs on rank ``j mod pp`` unless told otherwise."""
    return tuple(j % pp for j in range(microbatches))


def check_owner_map(owners: Sequence[int], microbatches: int, pp: int) -> tuple[int, ...]:
    """Validate a user owner map: one owner per microbatch, a permutation of ranks within each group."""
    owners = tuple(int(o) for o in owners)
    if len(owners) != microbatches:
        raise ValueError(
            f"owners has {len(owners)} entries but microbatches={microbatches}: give one rank per microbatch"
        )
    for g in range(microbatches // pp):
        group = owners[g * pp : (g + 1) * pp]
        if sorted(group) != list(range(pp)):
            raise ValueError(
                f"owners of group {g} (microbatches {g * pp}..{g * pp + pp - 1}) are {list(group)}: "
                f"each group must give every rank 0..{pp - 1} exactly one microbatch"
            )
    return owners
