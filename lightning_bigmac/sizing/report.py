"""``bigmac fit``'s readable output: the model and microbatch, each rank's bytes, or one row per layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict

from .estimate import GIB, FitEstimate
from .spec import ModelSpec, Workload

__all__ = ["fit_json", "fit_table", "rank_table"]


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:.0f}"


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _header(model: ModelSpec, wl: Workload, estimate: FitEstimate, costs: str) -> list[str]:
    parts = []
    for name, spec in model.parts().items():
        active = f" ({_count(spec.active_params)} active)" if spec.active_params != spec.params else ""
        parts.append(f"{name} {_count(spec.params)}{active}")
    opts = estimate.options
    shard = " ".join(f"{k}={v}" for k, v in opts.shard.items() if k in model.parts())
    precision = (
        "bf16 weights and gradients, fp32 master and Adam" if opts.precision == "bf16" else "fp32, Adam"
    )
    return [
        f"model: {model.name or 'explicit sizes'}: " + ", ".join(parts) + " parameters",
        f"microbatch: sequence {wl.sequence}, image tokens {wl.image_tokens}, encoder tokens "
        f"{wl.encoder_tokens}, generator tokens {wl.generator_tokens}; {wl.activation_bytes} B per "
        f"activation, {wl.logits_bytes} B per logit",
        f"memory: {precision}; shard {shard}; recompute {','.join(sorted(opts.recompute)) or 'none'}",
        f"device: {_gib(opts.device_memory)} GiB, {_gib(opts.reserved)} GiB reserved; "
        f"step times from {costs}",
    ]


def _layout(e: FitEstimate) -> str:
    p = e.plan
    knobs = (" (" + ", ".join(f"{k}={v}" for k, v in p.knobs.items()) + ")") if p.knobs else ""
    frozen = f" frozen={','.join(sorted(p.frozen))}" if p.frozen else ""
    return (
        f"{p.schedule}: pp={p.pp} vpp={p.vpp} dp={e.dp} microbatches={p.microbatches}{frozen} "
        f"({p.pp * e.dp} ranks){knobs}"
    )


def _verdict(e: FitEstimate) -> str:
    b = e.busiest
    if e.fits:
        return f"fits: PP{b.rank} needs {_gib(b.total)} of {_gib(e.budget)} GiB"
    return f"does NOT fit: PP{b.rank} needs {_gib(b.total)} of {_gib(e.budget)} GiB"


def rank_table(model: ModelSpec, wl: Workload, e: FitEstimate, costs: str) -> str:
    """Every rank's bytes by kind and part, for one layout."""
    lines = [*_header(model, wl, e, costs), _layout(e)]
    lines.append(f"step time {e.step_time:.4g} (lower bound {e.lower_bound:.4g})")
    lines.append("GiB per rank".ljust(26) + "".join(f"{'PP' + str(r.rank):>8}" for r in e.ranks))

    def row(label: str, values: Sequence[float]) -> None:
        lines.append(f"  {label:<24}" + "".join(f"{_gib(v):>8}" for v in values))

    for kind in ("weights", "gradients", "optimizer", "activations"):
        for part in model.parts():
            row(f"{kind} {part}", [getattr(r, kind)[part] for r in e.ranks])
    for kind in ("recompute", "gathered", "transport", "total"):
        row(kind, [getattr(r, kind) for r in e.ranks])
    lines.append("peak live microbatches".ljust(26))
    for part in model.parts():
        lines.append(f"  {part:<24}" + "".join(f"{r.peak_live[part]:>8}" for r in e.ranks))
    lines.append(_verdict(e))
    return "\n".join(line.rstrip() for line in lines)


def fit_table(
    model: ModelSpec, wl: Workload, estimates: Sequence[FitEstimate], skipped: Mapping[str, str], costs: str
) -> str:
    """One row per layout: step time (and against ``ideal`` at the same M), the busiest rank's bytes."""
    lines = [*_header(model, wl, estimates[0], costs)] if estimates else []
    ideal = {e.plan.microbatches: e.step_time for e in estimates if e.plan.schedule == "ideal"}
    parts = list(model.parts())
    head = f"{'schedule':<11}{'M':>5}{'step':>10}{'ideal/step':>11}{'rank':>6}{'total GiB':>11}"
    lines.append(head + "".join(f"{'act ' + p[:3]:>9}" for p in parts) + "  fits")
    for e in estimates:
        b = e.busiest
        ref = ideal.get(e.plan.microbatches)
        ratio = f"{ref / e.step_time:.3f}" if ref else "-"
        acts = "".join(f"{_gib(b.activations[p]):>9}" for p in parts)
        rank = f"PP{b.rank}"
        lines.append(
            f"{e.plan.schedule:<11}{e.plan.microbatches:>5}{e.step_time:>10.4g}{ratio:>11}{rank:>6}"
            f"{_gib(b.total):>11}{acts}  {'yes' if e.fits else 'NO'}"
        )
    if estimates:
        e = estimates[0]
        lines.append(
            f"layout: pp={e.plan.pp} vpp={e.plan.vpp} dp={e.dp}; budget {_gib(e.budget)} GiB per rank"
        )
    lines += [f"skipped {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines)


def fit_json(
    model: ModelSpec, wl: Workload, estimates: Sequence[FitEstimate], skipped: Mapping[str, str], costs: str
) -> dict:
    """Everything as JSON-ready data (bytes, not GiB)."""
    return {
        "model": asdict(model),
        "workload": asdict(wl),
        "costs": costs,
        "estimates": [e.to_dict() for e in estimates],
        "skipped": dict(skipped),
    }
