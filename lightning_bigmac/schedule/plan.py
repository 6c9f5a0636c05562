"""Ops and plans: one optimizer step of a pipeline schedule as plain, immutable data.

Every layer reads the same objects: builders write a :class:`Plan`, the validator proves it,
the simulator times it, the pictures draw it and the runtime replays it. The string form of an
op is the project's lingua franca (logs, JSON, error grids, profiler ranges):

=============  ===========================================================================
``F<c>.<j>``   LLM forward of this rank's chunk ``c`` for microbatch ``j``
``B<c>.<j>``   LLM backward of this rank's chunk ``c`` for microbatch ``j``
``EF.<j>``     encoder forward of microbatch ``j`` (on the rank that owns ``j``'s encoder work)
``EB.<j>``     encoder backward of microbatch ``j``
``G.<j>``      generator forward, loss and backward of microbatch ``j``, back to back
=============  ===========================================================================

A plan may *split* its backward (zero-bubble pipelining, ``bigmac_zb``): then ``B`` and ``G``
give way to an op that computes the gradients sent upstream and a later one that computes the
weight gradients, which have no consumer and can wait for a bubble:

=============  ===========================================================================
``I<c>.<j>``   LLM backward of chunk ``c`` for microbatch ``j``: gradients of its inputs only
``W<c>.<j>``   LLM backward of chunk ``c`` for microbatch ``j``: gradients of its weights
``GI.<j>``     generator forward, loss and the gradient of its input (the last stage's ``I``
               waits for it)
``GW.<j>``     generator weight gradients of microbatch ``j``
=============  ===========================================================================

A plan may name *frozen* modules (``Plan.frozen``, a subset of ``encoder``, ``llm``, ``generator``):
modules without a trainable parameter. A frozen module's ops compute no weight gradients, so the
step drops every backward op that has nothing left to compute (:func:`step_kinds`): ``EB`` of a
frozen encoder; ``B`` (or ``I`` and ``W``) when the LLM and everything upstream of it are frozen,
only ``W`` when the LLM is frozen but the encoder trains (``I`` still carries the encoder's
gradients); ``GW`` of a frozen generator. A forward whose activations no backward reads keeps
nothing (the runtime runs it without autograd).

LLM ops name a chunk, not a stage: chunk ``c`` on rank ``r`` is stage ``c * pp + r``, so the
same string appears once on every rank. Encoder and generator ops appear once per step, on
their owner's list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "EB",
    "EF",
    "GI",
    "GW",
    "LLM_KINDS",
    "MODULES",
    "MODULE_OF_KIND",
    "SPLIT_KINDS",
    "B",
    "F",
    "G",
    "I",
    "Op",
    "Plan",
    "PlanFormatError",
    "StepKinds",
    "W",
    "step_kinds",
]

F, B, EF, EB, G = "F", "B", "EF", "EB", "G"
I, W, GI, GW = "I", "W", "GI", "GW"  # noqa: E741 (the op kinds' one-letter names)
LLM_KINDS = frozenset({F, B, I, W})
SPLIT_KINDS = frozenset({I, W, GI, GW})
"""The kinds of a plan whose backward is split (and only of such a plan)."""
MODULES = ("encoder", "llm", "generator")
MODULE_OF_KIND = {
    F: "llm", B: "llm", I: "llm", W: "llm", EF: "encoder", EB: "encoder", G: "generator",
    GI: "generator", GW: "generator",
}  # fmt: skip

_OP_RE = re.compile(r"^(?:(?P<llm>[FBIW])(?P<chunk>\d+)|(?P<mod>EF|EB|GI|GW|G))\.(?P<mb>\d+)$")

FORMAT_VERSION = 1


class PlanFormatError(ValueError):
    """A plan or op could not be read: the text names the offending value and the expected form."""


class Op(NamedTuple):
    """One unit of work on one rank. A named tuple so that plans of ~10k ops hash and compare fast."""

    kind: str
    microbatch: int
    chunk: int = -1  # only LLM ops (F, B, I, W) have a chunk

    def __str__(self) -> str:
        if self.kind in LLM_KINDS:
            return f"{self.kind}{self.chunk}.{self.microbatch}"
        return f"{self.kind}.{self.microbatch}"

    @property
    def module(self) -> str:
        """``"encoder"``, ``"llm"`` or ``"generator"``: whose activations this op creates or frees."""
        return MODULE_OF_KIND[self.kind]

    @classmethod
    def parse(cls, text: str) -> Op:
        """Read the string form (``F1.12``, ``EF.3``, ...) back; raises :class:`PlanFormatError`."""
        m = _OP_RE.match(text.strip())
        if m is None:
            raise PlanFormatError(
                f"cannot read op {text!r}: expected F<chunk>.<mb>, B<chunk>.<mb>, I<chunk>.<mb>, "
                "W<chunk>.<mb>, EF.<mb>, EB.<mb>, G.<mb>, GI.<mb> or GW.<mb>"
            )
        if m["llm"]:
            return cls(m["llm"], int(m["mb"]), int(m["chunk"]))
        return cls(m["mod"], int(m["mb"]))


class StepKinds(NamedTuple):
    """The op kinds one step runs, and which of them hold a unit of activations (see :func:`step_kinds`)."""

    run: frozenset[str]
    """Every op kind the step contains."""
    opens: frozenset[str]
    """Forward-side kinds (``F``, ``EF``, ``G``, ``GI``) whose graph a backward reads: they keep
    their module's unit of activations. The others run without autograd and keep nothing."""
    closes: frozenset[str]
    """Kinds that free such a unit: the last op that reads it (``G``, or a ``GI`` without ``GW``,
    frees its own)."""
    records: frozenset[str]
    """Kinds that run with autograd recording: ``opens`` and every backward-side kind."""


_FORWARD_SIDE = frozenset({F, EF, G, GI})


@lru_cache(maxsize=64)
def step_kinds(
    encoder: bool, generator: bool, forward_only: bool, split_backward: bool, frozen: frozenset[str]
) -> StepKinds:
    """What a step of these modules runs. A module *trains* when it is in the step and not frozen
    (nothing trains in a forward-only step); its ops run a backward when it trains or, for the LLM
    and the generator, when the module feeding them runs one (gradients pass through a frozen
    module to the trainable one upstream)."""
    trains = {m for m, on in zip(MODULES, (encoder, True, generator), strict=True) if on and m not in frozen}
    if forward_only:
        trains = set()
    back = {"encoder"} & trains
    if "llm" in trains or back:
        back.add("llm")
    if "generator" in trains or "llm" in back:
        back.add("generator")
    run, opens, closes = {F}, set(), set()
    if encoder:
        run.add(EF)
        if "encoder" in back:
            run.add(EB)
            opens.add(EF)
            closes.add(EB)
    if "llm" in back:
        llm = ({I, W} if "llm" in trains else {I}) if split_backward else {B}
        run |= llm
        opens.add(F)
        closes.add(W if W in llm else I if split_backward else B)
    if generator:
        gen = ({GI, GW} if "generator" in trains else {GI}) if split_backward else {G}
        run |= gen
        if "generator" in back:
            opens.add(GI if split_backward else G)
            closes.add(GW if GW in gen else GI if split_backward else G)
    records = opens | (run - _FORWARD_SIDE)
    return StepKinds(frozenset(run), frozenset(opens), frozenset(closes), frozenset(records))


_ORDER = (EF, EB, G, GI, GW, F, B, I, W)


def step_ops(pp: int, vpp: int, microbatches: int, kinds: frozenset[str]) -> list[tuple[int, Op]]:
    """Every op one step of ``kinds`` (:attr:`StepKinds.run`) must contain, each once: LLM ops with
    their rank, encoder and generator ops with rank -1 (they may run on any owner)."""
    present = [k for k in _ORDER if k in kinds]
    module = [k for k in present if k not in LLM_KINDS]
    llm = [k for k in present if k in LLM_KINDS]
    ops: list[tuple[int, Op]] = []
    for j in range(microbatches):
        ops += [(-1, Op(k, j)) for k in module]
        ops += [(r, Op(k, j, c)) for r in range(pp) for c in range(vpp) for k in llm]
    return ops


def _ops(items: Iterable[Op | str]) -> tuple[Op, ...]:
    return tuple(o if isinstance(o, Op) else Op.parse(o) for o in items)


@dataclass(frozen=True)
class Plan:
    """Per-rank ordered op lists for one optimizer step of one pipeline (the "global operator table").

    ``encoder`` / ``generator`` say whether the step has work for those modules; they are explicit
    so that a plan that lost all its ``EF`` ops is reported as incomplete rather than read as a
    text-only step. ``knobs`` records how a builder chose its free parameters (for bigmac: the
    warm encoder groups and the per-rank LLM warm-up extension); it is informational.
    """

    schedule: str
    pp: int
    vpp: int
    microbatches: int
    ranks: tuple[tuple[Op, ...], ...]
    encoder: bool = True
    generator: bool = True
    knobs: Mapping[str, Any] = field(default_factory=dict)
    forward_only: bool = False
    """Evaluation step: forwards (and generator losses) only, no ``B``/``EB`` ops, nothing kept."""
    split_backward: bool = False
    """Zero-bubble step: ``I``/``W`` ops instead of ``B``, ``GI``/``GW`` instead of ``G``."""
    frozen: frozenset[str] = frozenset()
    """Modules without a trainable parameter (of ``encoder``, ``llm``, ``generator``): the step
    runs no backward op that would compute nothing (:func:`step_kinds`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(_ops(r) for r in self.ranks))
        object.__setattr__(self, "frozen", frozenset(self.frozen))
        if not self.frozen <= set(MODULES):
            raise PlanFormatError(f"frozen={sorted(self.frozen)}: name modules among {', '.join(MODULES)}")
        if len(self.ranks) != self.pp:
            raise PlanFormatError(f"plan has {len(self.ranks)} rank lists but pp={self.pp}")
        if self.forward_only and self.split_backward:
            raise PlanFormatError("a forward-only plan has no backward to split: set split_backward=False")

    # ---- derived views -------------------------------------------------------------------
    @property
    def kinds(self) -> StepKinds:
        """The op kinds this step runs and which of them keep activations (:func:`step_kinds`)."""
        return step_kinds(self.encoder, self.generator, self.forward_only, self.split_backward, self.frozen)

    def step_ops(self) -> list[tuple[int, Op]]:
        """Every op this step must contain (see :func:`step_ops`)."""
        return step_ops(self.pp, self.vpp, self.microbatches, self.kinds.run)

    def owners(self, module: str) -> list[int | None]:
        """Rank that runs each microbatch's ``encoder`` or ``generator`` work (None if absent)."""
        kinds = {"encoder": (EF,), "generator": (G, GI)}[module]
        owner: list[int | None] = [None] * self.microbatches
        for rank, ops in enumerate(self.ranks):
            for op in ops:
                if op.kind in kinds and 0 <= op.microbatch < self.microbatches:
                    owner[op.microbatch] = rank
        return owner

    def warmup_forwards(self) -> list[int]:
        """LLM forwards each rank runs before its first LLM backward (the paper's warm-up depth)."""
        counts = []
        for ops in self.ranks:
            n = 0
            for op in ops:
                if op.kind in (B, I):
                    break
                n += op.kind == F
            counts.append(n)
        return counts

    def num_ops(self) -> int:
        return sum(len(r) for r in self.ranks)

    # ---- text ------------------------------------------------------------------------------
    def table(self, max_ops: int | None = None) -> str:
        """One row per rank, ops in program order, like the transcript of the paper's figure.

        Encoder and generator ops are bracketed (``[EF.4]``) as the transcript brackets columns.
        ``max_ops`` elides the middle of long rows, keeping the start and the end of the step.
        """
        cells = [[f"[{o}]" if o.kind not in LLM_KINDS else str(o) for o in ops] for ops in self.ranks]
        if max_ops is not None:
            half = max(1, max_ops // 2)
            cells = [c if len(c) <= max_ops else [*c[:half], "...", *c[-half:]] for c in cells]
        width = max((len(x) for row in cells for x in row), default=1)
        lines = [f"PP{r}: " + " ".join(x.ljust(width) for x in row).rstrip() for r, row in enumerate(cells)]
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (
            f"{self.schedule} plan: pp={self.pp} vpp={self.vpp} microbatches={self.microbatches} "
            f"encoder={self.encoder} generator={self.generator}"
            + (f" frozen={','.join(sorted(self.frozen))}" if self.frozen else "")
        )
        return head + "\n" + self.table(max_ops=48)

    # ---- JSON exchange format ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        split = {"split_backward": True} if self.split_backward else {}  # absent: False
        frozen = {"frozen": sorted(self.frozen)} if self.frozen else {}  # absent: nothing frozen
        return {
            "format": FORMAT_VERSION,
            "schedule": self.schedule,
            "pp": self.pp,
            "vpp": self.vpp,
            "microbatches": self.microbatches,
            "encoder": self.encoder,
            "generator": self.generator,
            "knobs": dict(self.knobs),
            "forward_only": self.forward_only,
            **split,
            **frozen,
            "ranks": [[str(o) for o in ops] for ops in self.ranks],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Read the exchange format; ``encoder``/``generator``/``split_backward`` default to whether
        such ops appear, ``frozen`` to nothing frozen."""
        missing = [k for k in ("schedule", "pp", "vpp", "microbatches", "ranks") if k not in data]
        if missing:
            raise PlanFormatError(f"plan JSON lacks key(s) {missing}; see docs/plan-format.md")
        ranks = [_ops(r) for r in data["ranks"]]
        kinds = {o.kind for r in ranks for o in r}
        return cls(
            schedule=str(data["schedule"]),
            pp=int(data["pp"]),
            vpp=int(data["vpp"]),
            microbatches=int(data["microbatches"]),
            ranks=tuple(ranks),
            encoder=bool(data.get("encoder", bool(kinds & {EF, EB}))),
            generator=bool(data.get("generator", bool(kinds & {G, GI, GW}))),
            knobs=dict(data.get("knobs", {})),
            forward_only=bool(data.get("forward_only", False)),
            split_backward=bool(data.get("split_backward", bool(kinds & SPLIT_KINDS))),
            frozen=frozenset(data.get("frozen", ())),
        )

    def to_json(self, **extra: Any) -> str:
        """JSON text; ``extra`` keys (e.g. ``simulation``) are added at the top level."""
        return json.dumps({**self.to_dict(), **extra}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanFormatError(f"plan file is not JSON: {err}") from err
        return cls.from_dict(data)

    def save(self, path: str | Path, **extra: Any) -> None:
        Path(path).write_text(self.to_json(**extra))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())
