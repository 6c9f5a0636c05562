"""One profiled training step, written out for people: Gantt chart, trace, cost file, memory report.

:meth:`BigMacStrategy.profile_next_step <lightning_bigmac.BigMacStrategy.profile_next_step>`
switches the runtime's per-op timing and activation accounting on for one step and hands the
result to global rank 0 as a :class:`StepProfile`. :meth:`StepProfile.write` produces:

==================  =================================================================================
``gantt.png``       the measured step, one row per pipeline rank, coloured like the paper's figure
``trace.json``      the same ops as a Chrome trace (open in https://ui.perfetto.dev)
``profile.json``    the ``bigmac-profile/1`` cost file: ``bigmac plan --costs profile.json`` replays it
``memory.png``      live activations per module and rank over the measured step (in microbatches)
``memory.md``       peak saved-activation bytes per module per rank, measured, next to the simulator's
                    peak in microbatches for the same plan; a frozen module's column says so (its
                    forwards keep nothing, so both are 0)
==================  =================================================================================
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .runtime.collectives import gather_object
from .runtime.executor import PipelineExecutor, StepResult
from .runtime.memory import ActivationMeter
from .runtime.profiler import OpEvent, OpProfiler, chrome_trace, cost_profile, measured_simulation
from .schedule import Plan, Simulation
from .schedule.pictures import draw_gantt, draw_memory
from .schedule.plan import MODULES

__all__ = ["StepProfile", "profiled_step"]


@dataclass(frozen=True)
class StepProfile:
    """What one profiled step did on every rank of one pipeline (data-parallel replica 0)."""

    step: int
    """The optimizer step (``trainer.global_step``) that was profiled."""
    plan: Plan
    events: list[OpEvent]
    """Every op's compute on every pipeline rank, seconds since the step's start barrier."""
    activation_peak: list[dict[str, int]]
    """Per pipeline rank: peak bytes saved for backward per module during the step."""
    wall: float
    """Seconds from the step's start to its return on pipeline rank 0 (gradient sync included)."""

    @cached_property
    def simulation(self) -> Simulation:
        """The measured step as a :class:`Simulation` (times in seconds)."""
        return measured_simulation(self.plan, self.events)

    def memory_table(self) -> str:
        """Markdown: measured peak bytes per module per rank, and the simulated peak in microbatches."""
        sim, frozen = self.simulation, self.plan.frozen
        modules = [m for m in MODULES if m in frozen or any(p.get(m, 0) for p in self.activation_peak)]
        names = {m: f"{m} (frozen)" if m in frozen else m for m in modules}
        head = "| rank | " + " | ".join(f"{names[m]} peak (MiB) | {m} live units" for m in modules) + " |"
        rule = "|---" * (1 + 2 * len(modules)) + "|"
        rows = [
            f"| PP{rank} | "
            + " | ".join(f"{peak.get(m, 0) / 2**20:.2f} | {sim.peak_live[m][rank]:g}" for m in modules)
            + " |"
            for rank, peak in enumerate(self.activation_peak)
        ]
        return "\n".join([head, rule, *rows])

    def summary(self) -> dict[str, object]:
        """Headline figures of the step, JSON-ready."""
        sim = self.simulation
        busiest = max(sim.busy)
        return {
            "step": self.step,
            "schedule": self.plan.schedule,
            "pp": self.plan.pp,
            "vpp": self.plan.vpp,
            "microbatches": self.plan.microbatches,
            "frozen": sorted(self.plan.frozen),
            "wall_s": round(self.wall, 4),
            "busiest_rank_compute_s": round(busiest, 4),
            "bubble_fraction": [round(b, 3) for b in sim.bubble_fraction],
            "activation_peak_bytes": self.activation_peak,
        }

    def write(self, dirpath: str | Path) -> list[Path]:
        """Write the files listed in the module docstring into ``dirpath``; returns their paths."""
        out = Path(dirpath)
        out.mkdir(parents=True, exist_ok=True)
        sim = self.simulation
        plan = self.plan
        what = f"step {self.step}, {plan.schedule} pp={plan.pp} vpp={plan.vpp} M={plan.microbatches}"
        what += f", frozen {', '.join(sorted(plan.frozen))}" if plan.frozen else ""
        gantt = draw_gantt(sim, out / "gantt.png", title=f"Measured {what}: {sim.step_time * 1e3:.0f} ms")
        memory = draw_memory(sim, out / "memory.png", title=f"Live activations, measured {what}")
        chrome_trace(self.events, out / "trace.json")
        cost_profile(plan, self.events, out / "profile.json")
        table = out / "memory.md"
        frozen = "Frozen modules run their forwards without autograd and keep nothing.\n"
        frozen = frozen if plan.frozen else ""
        table.write_text(
            f"# Activation memory, {what}\n\n"
            "Peak bytes saved for backward per module on each rank (measured with saved_tensors_hooks),\n"
            f"and the most microbatches of that module each rank held at once (live units).\n{frozen}\n"
            f"{self.memory_table()}\n"
        )
        summary = out / "step.json"
        summary.write_text(json.dumps(self.summary(), indent=1))
        return [gantt, memory, out / "trace.json", out / "profile.json", table, summary]


def profiled_step(
    executor: PipelineExecutor, plan: Plan, microbatches: Sequence[Any], step: int
) -> tuple[StepResult, StepProfile | None]:
    """Run one step with op timing and activation accounting switched on, then off again.

    A collective over the world: every rank calls it for the same step. Returns the step's result
    and, on global rank 0 only, the :class:`StepProfile` of its pipeline (replica 0).
    """
    ex, groups = executor, executor.groups
    ex.profiler, ex.memory = OpProfiler(ex.rank, ex.device, ex.watch), ActivationMeter(ex.parameters())
    try:
        start = time.perf_counter()
        result = ex.step(plan, microbatches)
        wall = time.perf_counter() - start
        events = ex.profiler.gather(groups.pipeline_group, dst=groups.pipeline_ranks[0])
        peaks = gather_object(
            result.activation_peak, groups.pipeline_ranks[0], groups.pipeline_group, ex.watch,
            "the activation peaks gather", ex.device,
        )  # fmt: skip
    finally:
        ex.profiler = ex.memory = None
    if groups.rank != 0:
        return result, None
    assert events is not None and peaks is not None
    return result, StepProfile(step, plan, events, peaks, wall)
