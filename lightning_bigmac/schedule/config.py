"""The schedule's configuration, checked before anything is built or launched."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .dataflow import check_owner_map
from .plan import MODULES, StepKinds, step_kinds

__all__ = ["SCHEDULES", "ScheduleConfig"]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "megatron", "ideal", "bigmac", "bigmac_zb")
"""Builder names. ``gpipe``/``1f1b``/``interleaved`` fix the LLM order and, like ``megatron``,
run the encoder inside stage 0 and the generator inside the last stage; ``megatron`` picks 1F1B
for ``vpp == 1`` and interleaved 1F1B otherwise; ``ideal``, ``bigmac`` and ``bigmac_zb`` run
encoder and generator data-parallel over the pipeline ranks; ``bigmac_zb`` also splits every
backward into input- and weight-gradient ops and fills the pipeline's bubbles with the latter."""

_GROUPED = {"interleaved", "ideal", "bigmac", "bigmac_zb"}
_NESTED = {"ideal", "bigmac", "bigmac_zb"}
_KNOB_SCHEDULES = {
    "encoder_warmup": ("ideal", "bigmac"),
    "llm_warmup": ("ideal", "bigmac"),
    "held_columns": ("bigmac_zb",),
    "weight_deferral": ("bigmac_zb",),
}
_KNOB_DEFAULTS = {"encoder_warmup": None, "llm_warmup": "auto", "held_columns": None, "weight_deferral": None}


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Everything a builder needs besides op costs."""

    schedule: str = "bigmac"
    """One of :data:`SCHEDULES`."""
    pp: int
    """Pipeline ranks P."""
    vpp: int = 1
    """Virtual chunks per rank V (interleaving); the LLM is cut into ``pp * vpp`` stages."""
    microbatches: int
    """Microbatches M per optimizer step per data-parallel replica."""
    encoder: bool = True
    """Whether the step has encoder work (False: a text-only step)."""
    generator: bool = True
    """Whether the step has generator work."""
    encoder_warmup: int | None = None
    """bigmac: W, encoder-forward groups run before any LLM op. None ("auto"): the smallest safe W
    whose simulated step time is within 2% of ``ideal``'s. Memory grows with W, step time shrinks."""
    llm_warmup: str | int | Sequence[int] = "auto"
    """bigmac/ideal: extra LLM forwards per rank before 1F1B's steady phase. ``"minimal"``: the
    smallest per-rank extension that is deadlock-free; ``"group"``: ``pp`` on every rank (the
    paper's figure); ``"auto"``: for ideal ``"group"`` with a generator and 0 without, for
    bigmac the smallest extension, equal on every rank, that is deadlock-free and keeps the step
    within 2% of ideal, plus one on the first ranks where the cost model's transfer latency
    makes that 0.5% faster; an int for every rank, or one int per rank."""
    held_columns: int | None = None
    """bigmac_zb: encoder microbatches a rank may hold from ``EF`` to its deferred ``EB`` (and
    generator microbatches from ``GI`` to ``GW``); None: the smallest value up to bigmac's W whose
    step stays within 0.5% of W's (docs/schedules.md), the same at every M."""
    weight_deferral: int | None = None
    """bigmac_zb: LLM units a rank may hold beyond Megatron's 1F1B peak so that its weight-gradient
    ops can wait for a bubble; None: the smallest value in 0..pp whose step stays within 0.5% of
    pp's, the same at every M."""
    forward_only: bool = False
    """An evaluation step: forwards and generator losses only. Each rank runs its forwards chunk
    by chunk (nothing is kept for a backward, so there is nothing to interleave); the knobs above
    do not apply and are ignored."""
    owners: Sequence[int] | None = None
    """ideal/bigmac/bigmac_zb: rank running microbatch j's encoder and generator work; a permutation of
    0..pp-1 within each group of pp microbatches. None: j mod pp."""
    frozen: Collection[str] = frozenset()
    """Modules without a trainable parameter, of ``encoder``, ``llm`` and ``generator`` (a
    collection, or one comma-separated string): the plan drops the backward ops that would compute
    nothing (:func:`~lightning_bigmac.schedule.plan.step_kinds`). Stored as a frozenset."""

    def __post_init__(self) -> None:
        names = self.frozen.split(",") if isinstance(self.frozen, str) else self.frozen
        object.__setattr__(self, "frozen", frozenset(n.strip() for n in names if n.strip()))
        self.check()

    @property
    def groups(self) -> int:
        return self.microbatches // self.pp

    @property
    def kinds(self) -> StepKinds:
        """The op kinds a plan of this config runs (``bigmac_zb`` splits its backward)."""
        split = self.schedule == "bigmac_zb" and not self.forward_only
        return step_kinds(self.encoder, self.generator, self.forward_only, split, self.frozen)

    @property
    def nested(self) -> bool:
        """Whether encoder and generator run data-parallel on their owners (not inside stages)."""
        return self.schedule in _NESTED

    def check(self) -> None:
        """Raise ``ValueError`` naming the field, the value and the fix for a config no builder accepts."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("pp", "vpp", "microbatches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = sorted(set(self.frozen) - set(MODULES))
        if unknown:
            raise ValueError(f"frozen names {unknown}: name modules among {', '.join(MODULES)}")
        if self.schedule == "1f1b" and self.vpp != 1:
            raise ValueError(f"schedule '1f1b' has one chunk per rank but vpp={self.vpp}; use 'interleaved'")
        if self.schedule == "interleaved" and self.vpp < 2:
            raise ValueError("schedule 'interleaved' needs vpp >= 2; use '1f1b' for vpp=1")
        grouped = self.schedule in _GROUPED or (self.schedule == "megatron" and self.vpp > 1)
        if grouped and self.microbatches % self.pp:
            lo = max(self.pp, self.microbatches // self.pp * self.pp)
            raise ValueError(
                f"microbatches={self.microbatches} is not a multiple of pp={self.pp}: schedule "
                f"{self.schedule!r} (vpp={self.vpp}) runs microbatches in groups of pp; "
                f"use {lo} or {lo + self.pp}"
            )
        for name, default in (("owners", None), *_KNOB_DEFAULTS.items()):
            allowed = _KNOB_SCHEDULES.get(name, _NESTED)
            if getattr(self, name) != default and self.schedule not in allowed:
                why = (
                    ", which runs the encoder inside stage 0 and the generator inside the last stage"
                    if self.schedule not in _NESTED
                    else ": its knobs are held_columns and weight_deferral"
                    if self.schedule == "bigmac_zb"
                    else ": leave it unset"
                )
                raise ValueError(f"{name} applies to {_names(allowed)}, not {self.schedule!r}{why}")
        for name, least in (("held_columns", 1), ("weight_deferral", 0)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name}={value} must be >= {least} (or None: chosen automatically)")
        if self.owners is not None:
            check_owner_map(self.owners, self.microbatches, self.pp)
        if self.encoder_warmup is not None and not 1 <= self.encoder_warmup <= self.groups:
            raise ValueError(
                f"encoder_warmup={self.encoder_warmup} must be between 1 and the number of groups "
                f"({self.groups} = microbatches / pp)"
            )
        w = self.llm_warmup
        if isinstance(w, str):
            if w not in ("auto", "minimal", "group"):
                raise ValueError(
                    f"llm_warmup={w!r}: use 'auto', 'minimal', 'group', an int or one int per rank"
                )
        elif isinstance(w, int):
            if w < 0:
                raise ValueError(f"llm_warmup={w} must be >= 0")
        elif len(w) != self.pp or any(int(x) < 0 for x in w):
            raise ValueError(f"llm_warmup={list(w)} must give one extension >= 0 per rank ({self.pp} ranks)")


def _names(schedules: Collection[str]) -> str:
    """``the 'ideal' and 'bigmac' schedules``: the wording of a knob's error."""
    quoted = [f"'{s}'" for s in sorted(schedules, key=SCHEDULES.index)]
    if len(quoted) == 1:
        return f"the {quoted[0]} schedule"
    return "the " + ", ".join(quoted[:-1]) + f" and {quoted[-1]} schedules"
