"""The schedule's configuration, checked before anything is built or launched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .dataflow import check_owner_map

__all__ = ["SCHEDULES", "ScheduleConfig"]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "megatron", "ideal", "bigmac")
"""Builder names. ``gpipe``/``1f1b``/``interleaved`` fix the LLM order and, like ``megatron``,
run the encoder inside stage 0 and the generator inside the last stage; ``megatron`` picks 1F1B
for ``vpp == 1`` and interleaved 1F1B otherwise; ``ideal`` and ``bigmac`` run encoder and
generator data-parallel over the pipeline ranks."""

_GROUPED = {"interleaved", "ideal", "bigmac"}
_NESTED = {"ideal", "bigmac"}


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
    forward_only: bool = False
    """An evaluation step: forwards and generator losses only. Each rank runs its forwards chunk
    by chunk (nothing is kept for a backward, so there is nothing to interleave); the knobs above
    do not apply and are ignored."""
    owners: Sequence[int] | None = None
    """ideal/bigmac: rank running microbatch j's encoder and generator work; a permutation of
    0..pp-1 within each group of pp microbatches. None: j mod pp."""

    def __post_init__(self) -> None:
        self.check()

    @property
    def groups(self) -> int:
        return self.microbatches // self.pp

    def check(self) -> None:
        """Raise ``ValueError`` naming the field, the value and the fix for a config no builder accepts."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("pp", "vpp", "microbatches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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
        if self.schedule not in _NESTED:
            for name, default in (("owners", None), ("encoder_warmup", None), ("llm_warmup", "auto")):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name} applies to the 'ideal' and 'bigmac' schedules, not {self.schedule!r}, "
                        "which runs the encoder inside stage 0 and the generator inside the last stage"
                    )
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
