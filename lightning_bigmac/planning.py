"""Which plan each step runs: the strategy's schedule knobs, the costs plans are built with, a cache.

A plan depends on the step's microbatch count, its owner map (the balancer picks owners per
step), whether the step is forward-only (validation), which parts the model has and which of them
are frozen (no parameter requires grad: the plan drops the backward ops they make pointless).
The frozen set is read from ``requires_grad`` at every step, so freezing or unfreezing a part
between steps (e.g. a vision encoder trained only after a warm-up) switches plans. Plans are pure
data, so every rank builds the same one from the same inputs without talking to the others.

``costs`` decides what the planner optimises for: unit costs (the plan is known before the first
step), a cost file, or ``"profile"``: the first training step is timed and every later step is
planned with its measured per-kind durations and transfer latency (:meth:`Planner.adopt_profile`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .runtime.parts import PipelineParts
from .runtime.plan_fit import frozen_parts
from .runtime.profiler import planning_costs
from .schedule import OpCosts, Plan, ScheduleConfig, build_plan
from .step_report import StepProfile

__all__ = ["Planner"]


class Planner:
    """Builds and caches the plans of a run's steps.

    Args:
        config: the schedule and its knobs (validated: an unsafe W or warm-up fails here, before
            any process starts, because a trial plan is built).
        costs: None (unit costs), the path of a cost file or runtime profile (its per-kind means),
            or ``"profile"`` (plan with the first training step's measured costs, see :meth:`adopt_profile`).
    """

    def __init__(self, config: ScheduleConfig, costs: str | None = None) -> None:
        self.config = config
        self.costs: OpCosts | None = None
        """The costs plans are built with now (None: unit costs)."""
        if costs not in (None, "profile"):
            try:
                self.costs = OpCosts.load(costs).typical()
            except (OSError, ValueError, TypeError) as err:
                raise ValueError(
                    f"costs={costs!r}: give None, 'profile' or the path of a cost file or runtime "
                    f"profile ({err})"
                ) from err
        self.wants_profile = costs == "profile"
        """Whether the next training step should be profiled to plan the later ones with."""
        self.encoder = self.generator = True
        self.parts: PipelineParts | None = None
        """The model's parts, once known: which exist, and which are frozen at each step."""
        build_plan(config, costs=self.costs)
        self._plans: dict[tuple, Plan] = {}

    def use_parts(self, parts: PipelineParts) -> None:
        """Plan for this model: with (or without) an encoder and a generator, and with the parts
        that have no trainable parameter frozen (read again for every step)."""
        encoder, generator = parts.encoder is not None, parts.generator is not None
        if (encoder, generator) != (self.encoder, self.generator):
            self.encoder, self.generator = encoder, generator
            self._plans.clear()
        self.parts = parts

    def frozen(self) -> frozenset[str]:
        """The modules the next step's plan treats as frozen: the parts' now, else the config's."""
        return frozen_parts(self.parts) if self.parts is not None else frozenset(self.config.frozen)

    def plan_for(
        self, microbatches: int, owners: list[int] | None = None, forward_only: bool = False
    ) -> Plan:
        """The (cached) plan of a step with ``microbatches`` microbatches and this owner map, for
        the parts frozen now."""
        frozen = self.frozen()
        key = (microbatches, tuple(owners) if owners is not None else None, forward_only, frozen)
        if key not in self._plans:
            cfg = self.config
            try:
                self._plans[key] = build_plan(
                    cfg.schedule,
                    costs=self.costs,
                    pp=cfg.pp,
                    vpp=cfg.vpp,
                    microbatches=microbatches,
                    encoder=self.encoder,
                    generator=self.generator,
                    encoder_warmup=cfg.encoder_warmup if microbatches == cfg.microbatches else None,
                    llm_warmup=cfg.llm_warmup,
                    held_columns=cfg.held_columns,
                    weight_deferral=cfg.weight_deferral,
                    owners=owners if cfg.nested else None,
                    forward_only=forward_only,
                    frozen=frozen,
                )
            except ValueError as err:
                raise ValueError(f"cannot plan a step of {microbatches} microbatches: {err}") from err
        return self._plans[key]

    def adopt_profile(
        self, profile: StepProfile | None, agree: Callable[[Any], Any], microbatches: int
    ) -> str:
        """Plan every later step with a profiled step's per-kind mean costs and transfer latency.

        ``profile`` is the step's :class:`StepProfile` where it was gathered (global rank 0) and None
        elsewhere; ``agree`` hands every rank the same value (the strategy's broadcast from global
        rank 0), so every rank builds the same plans. Returns a line saying what changed, to log.
        """
        costs = agree(planning_costs(profile.plan, profile.events) if profile is not None else None)
        self.wants_profile = False
        if costs is None:
            return "no profile came back: later steps keep the current costs"
        self.costs = costs
        self._plans.clear()
        knobs = ", ".join(f"{k}={v}" for k, v in self.plan_for(microbatches).knobs.items())
        return (
            f"later steps are planned with a profiled step's costs (transfer latency "
            f"{costs.latency * 1e3:.2f} ms): {knobs}"
        )
