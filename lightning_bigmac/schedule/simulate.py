"""Simulate a plan under a cost model: timeline, step time, bubbles, live activations, lower bound.

Live activations are counted per module per rank in *microbatch units*: an encoder or generator
unit is one microbatch's activations of that module; an LLM unit is one microbatch's activations
of one chunk (so Megatron's interleaved 1F1B peaks at warm-up + 1 units). An op allocates its
module's unit when it starts (F, EF, G, GI) and frees it when it ends (B, EB, G, and in a split
backward W and GW: the weight gradients need the activations, so the input-gradient ops I and
GI free nothing). Because ops on a
rank run one after another, the peaks depend only on each rank's op order, not on durations.
A forward that no backward reads keeps nothing (:attr:`~lightning_bigmac.schedule.plan.StepKinds.opens`):
a forward-only (evaluation) plan's peaks are 0, and so are a frozen encoder's; a frozen LLM's
units are freed at ``I`` when the step has no ``W``, a frozen generator's at the end of ``GI``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from .costs import OpCosts
from .dataflow import DataFlow
from .engine import Interval, replay
from .plan import LLM_KINDS, MODULES, Plan
from .validate import validate

__all__ = ["Simulation", "lower_bound", "simulate"]


def lower_bound(plan: Plan, costs: OpCosts) -> float:
    """Bubble-free step time: the busiest rank's LLM work plus an even share of encoder/generator work.

    No schedule of this plan's ops on ``pp`` ranks can be faster, whatever the placement of the
    encoder and generator (they are data-parallel at best).
    """
    llm = [0.0] * plan.pp
    shared = 0.0
    for r, ops in enumerate(plan.ranks):
        for op in ops:
            if op.kind in LLM_KINDS:
                llm[r] += costs.duration(r, op, plan.frozen)
            else:
                shared += costs.duration(r, op, plan.frozen)
    return max(llm) + shared / plan.pp


@dataclass(frozen=True)
class Simulation:
    """What a plan does under a cost model. Times are in the cost model's unit."""

    plan: Plan = field(repr=False)
    costs: OpCosts = field(repr=False)
    intervals: tuple[tuple[Interval, ...], ...] = field(repr=False)
    """Per rank, every op's run in program order."""

    @cached_property
    def step_time(self) -> float:
        return max((iv.end for row in self.intervals for iv in row), default=0.0)

    @cached_property
    def busy(self) -> tuple[float, ...]:
        return tuple(sum(iv.end - iv.start for iv in row) for row in self.intervals)

    @property
    def bubble_fraction(self) -> tuple[float, ...]:
        """Per rank, the share of the step the rank sat idle."""
        t = self.step_time
        return tuple(1.0 - b / t if t > 0 else 0.0 for b in self.busy)

    @cached_property
    def lower_bound(self) -> float:
        return lower_bound(self.plan, self.costs)

    def _live(self, module: str, weight) -> tuple[float, ...]:
        kinds = self.plan.kinds
        peaks = []
        for ops in self.plan.ranks:
            live = peak = 0.0
            for op in ops:
                if op.module != module:
                    continue
                w = weight(op)
                if op.kind in kinds.opens:
                    peak = max(peak, live + w)
                    live += w
                if op.kind in kinds.closes:
                    live -= w
            peaks.append(peak)
        return tuple(peaks)

    @cached_property
    def peak_live(self) -> dict[str, tuple[int, ...]]:
        """Per module, per rank: most microbatch units alive at once."""
        return {m: tuple(int(p) for p in self._live(m, lambda op: 1.0)) for m in MODULES}

    @cached_property
    def peak_bytes(self) -> dict[str, tuple[float, ...]] | None:
        """Like :attr:`peak_live` in bytes, when the cost model gives activation sizes."""
        if not self.costs.has_bytes:
            return None
        return {m: self._live(m, lambda op: self.costs.activation_bytes(op) or 0.0) for m in MODULES}

    def live_over_time(self, module: str) -> list[tuple[list[float], list[float]]]:
        """Per rank, a step function ``(times, live units)`` of ``module``'s activations."""
        curves, kinds = [], self.plan.kinds
        for row in self.intervals:
            times, counts, live = [0.0], [0.0], 0.0
            for iv in row:
                if iv.op.module != module:
                    continue
                if iv.op.kind in kinds.opens:
                    live += 1
                    times.append(iv.start)
                    counts.append(live)
                if iv.op.kind in kinds.closes:
                    live -= 1
                    times.append(iv.end)
                    counts.append(live)
            times.append(self.step_time)
            counts.append(live)
            curves.append((times, counts))
        return curves

    def summary(self, ideal_step_time: float | None = None) -> dict:
        """The ``simulation`` object of the JSON exchange format."""
        out = {
            "step_time": self.step_time,
            "ideal_step_time": ideal_step_time,
            "lower_bound": self.lower_bound,
            "bubble_fraction": list(self.bubble_fraction),
            "peak_live": {m: list(v) for m, v in self.peak_live.items()},
        }
        if self.peak_bytes is not None:
            out["peak_bytes"] = {m: list(v) for m, v in self.peak_bytes.items()}
        return out


def simulate(plan: Plan, costs: OpCosts | None = None, *, check: bool = True) -> Simulation:
    """Replay ``plan`` on the clock. ``check=False`` skips validation for plans a builder just proved."""
    costs = costs or OpCosts()
    costs.check_length(plan.microbatches)
    flow = validate(plan) if check else DataFlow.of_plan(plan)
    rows = replay(plan.ranks, flow, costs)
    return Simulation(plan, costs, tuple(tuple(r) for r in rows))
