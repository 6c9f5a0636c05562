"""Pictures of a simulated (or profiled) step: a Gantt chart like the paper's figure and live memory.

Matplotlib is imported lazily and used through ``Figure`` objects only, never ``pyplot``: planning
needs no display, importing the schedule package stays cheap, and a notebook's own backend and
open figures are left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .plan import EB, EF, GI, GW, MODULE_OF_KIND, MODULES, B, F, G, I, W

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .simulate import Simulation

__all__ = ["draw_gantt", "draw_memory", "figure", "op_color", "save"]

# The paper's palette: encoder yellow/orange, LLM forwards blue and backwards green (darker for
# later chunks), generator red. A split backward keeps green for the input gradients (I) and draws
# the deferred weight gradients (W) grey-violet, the generator's (GW) pink, so the bubbles they
# fill stand out. Ops of a frozen module are hatched: they compute no weight gradients.
_FIXED = {EF: "#fff2a8", EB: "#f5a623", G: "#e0606e", GI: "#e0606e", GW: "#f4b6c2"}
_BLUES = ["#8cc8f5", "#1f5fbf", "#5aa0e6", "#0b3a80"]
_GREENS = ["#9ddc9a", "#1e7a2a", "#5cb85c", "#0c4f17"]
_VIOLETS = ["#cfc4e6", "#6a5a9e", "#a596d0", "#463a70"]
_PANEL_OPS = 90  # ops per rank beyond which the chart shows the start and the end of the step


def op_color(kind: str, chunk: int) -> str:
    """Colour of an op: one per kind, and one per chunk for LLM ops."""
    if kind == F:
        return _BLUES[chunk % len(_BLUES)]
    if kind in (B, I):
        return _GREENS[chunk % len(_GREENS)]
    if kind == W:
        return _VIOLETS[chunk % len(_VIOLETS)]
    return _FIXED[kind]


def figure(**kwargs: Any) -> Figure:
    """A matplotlib ``Figure`` detached from ``pyplot`` (``savefig`` renders it with Agg)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path``, creating its folder (a ``pyplot``-free figure needs no closing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _windows(sim: Simulation) -> list[tuple[float, float, str]]:
    most = max(len(r) for r in sim.intervals)
    t = sim.step_time
    if most <= _PANEL_OPS:
        return [(0.0, t, "")]
    span = t * (_PANEL_OPS / 2) / most
    return [(0.0, span, "start of the step"), (t - span, t, "end of the step")]


def draw_gantt(sim: Simulation, path: str | Path, title: str | None = None) -> Path:
    """Write a Gantt chart (PNG, SVG or PDF by the file suffix): one row per rank, op cells labelled
    with their microbatch. Long steps are drawn as two panels, the start and the end, as in the paper.
    Ops of frozen modules are hatched and named so in the legend and the title."""
    from matplotlib.patches import Patch

    plan = sim.plan
    hatch = {m: "///" if m in plan.frozen else None for m in MODULES}
    windows = _windows(sim)
    fig = figure(figsize=(18, 0.55 * plan.pp * len(windows) + 1.6))
    axes = fig.subplots(len(windows), 1, squeeze=False)
    for ax, (lo, hi, label) in zip(axes[:, 0], windows, strict=True):
        width_per_unit = 18 * 72 / max(hi - lo, 1e-12)  # points per time unit, for label fitting
        for row in sim.intervals:
            for iv in row:
                if iv.end <= lo or iv.start >= hi:
                    continue
                color = op_color(iv.op.kind, iv.op.chunk)
                ax.barh(
                    iv.rank,
                    iv.end - iv.start,
                    left=iv.start,
                    height=0.9,
                    color=color,
                    edgecolor="black",
                    lw=0.3,
                    hatch=hatch[iv.op.module],
                )
                if (iv.end - iv.start) * width_per_unit >= 9:
                    dark = color in (_BLUES[1], _BLUES[3], _GREENS[1], _GREENS[3], _VIOLETS[1], _VIOLETS[3])
                    ax.text(
                        (iv.start + iv.end) / 2, iv.rank, str(iv.op.microbatch), ha="center", va="center",
                        fontsize=6.5, color="white" if dark else "black", clip_on=True,
                    )  # fmt: skip
        ax.set_xlim(lo, hi)
        ax.set_ylim(plan.pp - 0.5, -0.5)
        ax.set_yticks(range(plan.pp), [f"PP{r}" for r in range(plan.pp)])
        ax.set_xlabel("time" + (f" ({label})" if label else ""))
    names = {
        EF: "Encoder forward",
        EB: "Encoder backward",
        F: "LLM forward",
        B: "LLM backward",
        I: "LLM input grads",
        W: "LLM weight grads",
        G: "Generator fwd+bwd",
        GI: "Generator fwd+input grads",
        GW: "Generator weight grads",
    }
    rank_of = {EF: (0, 0), EB: (0, 1), G: (1 << 20, 0), GI: (1 << 20, 0), GW: (1 << 20, 1)}
    order = {F: 0, B: 1, I: 1, W: 2}
    present = sorted(
        {(op.kind, op.chunk) for ops in plan.ranks for op in ops},
        key=lambda kc: rank_of[kc[0]] if kc[0] in rank_of else (1 + kc[1], order[kc[0]]),
    )
    legend = []
    for k, c in present:
        label = names[k] + (f" (chunk {c})" if c >= 0 else "")
        shade = hatch[MODULE_OF_KIND[k]]
        legend.append(
            Patch(facecolor=op_color(k, c), edgecolor="black", lw=0.3, hatch=shade,
                  label=label + (" (frozen)" if shade else ""))
        )  # fmt: skip
    frozen = f", frozen {', '.join(m for m in MODULES if m in plan.frozen)}" if plan.frozen else ""
    fig.suptitle(
        title or f"{plan.schedule}: pp={plan.pp} vpp={plan.vpp} microbatches={plan.microbatches}{frozen}, "
        f"step time {sim.step_time:.4g}",
        y=0.99, fontsize=11,
    )  # fmt: skip
    top = 1 - 0.7 / fig.get_figheight()
    fig.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, top + 0.02), ncol=len(legend),
               fontsize=8, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, top - 0.03))
    return save(fig, path, dpi=130)


def draw_memory(sim: Simulation, path: str | Path, title: str | None = None) -> Path:
    """Write live activations over time, one panel per module with work, one line per rank."""
    modules = [m for m in MODULES if any(sim.peak_live[m])]
    fig = figure(figsize=(10, 2.3 * len(modules) + 0.8))
    axes = fig.subplots(len(modules), 1, sharex=True, squeeze=False)
    for ax, module in zip(axes[:, 0], modules, strict=True):
        for rank, (times, counts) in enumerate(sim.live_over_time(module)):
            ax.step(times, counts, where="post", label=f"PP{rank}", lw=1.2)
        unit = "chunk-microbatches" if module == "llm" else "microbatches"
        ax.set_ylabel(f"{module}\n({unit})", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(ncol=min(sim.plan.pp, 8), fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time")
    fig.suptitle(title or f"{sim.plan.schedule}: live activations per rank", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
