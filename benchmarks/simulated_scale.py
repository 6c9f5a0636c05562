"""Simulated scale: the example MLLM's measured op costs on the balancer's mix at P=8 and 16.

    python benchmarks/simulated_scale.py [--pps 8 16] [--vpp 2] [--microbatches 64 128 256] [--out DIR]

1. **Profile** (real, 2 gloo processes): the example MLLM of ``examples/mllm`` at its default
   sizes (:class:`~examples.mllm.config.ModelConfig`: ViT 96 wide x 2 blocks, LLM 128 wide x 4
   blocks, flow-matching head 256 wide x 2 blocks) runs ``--profile-steps`` bigmac steps (P=2,
   M=``--profile-microbatches``) on records of the example's own sources (synthetic shapes and
   photos: images and video frames of 16-64 px, drawing tasks for the generator). Microbatches
   hold 1 to 32 samples, so that op durations span a wide range of patch and token counts.
   Each op's duration is the median over the steps after the first.
2. **Fit** (:func:`fit_terms`): per op kind (encoder forward and backward, LLM forward and
   backward, generator), a fixed overhead plus a cost per patch, token or latent, by least squares,
   in seconds on this machine. Attention (the quadratic term per span) is not measurable at the
   example's span sizes (it is a few percent of an op; :func:`balancer.fit_coefficients` on this
   profile attributes up to 60% to it, which is noise), so it is set from FLOP ratios of the
   example's widths, as ``balancer/cost.py`` derives its defaults.
3. **Simulate**: the balancer benchmark's heterogeneous mix (``benchmarks/balancer_quality.py``:
   50% single images of 224-1344 px, 20% 2-6 images, 15% videos of 4-32 frames, 15% text only;
   Qwen2-VL geometry, token cap 8192), costed with those terms (document-masked attention, as
   the example model has) and packed by :func:`balancer.pack` into M microbatches for P
   pipeline ranks, is simulated under ``bigmac``, ``ideal`` (both with the balancer's owners) and
   ``megatron`` (interleaved 1F1B, encoder in stage 0) with V=2. The mix has no generated
   images, so the generator does no work here (as in the balancer benchmark). The same sweep
   with the balancer's default costs (FLOP ratios of the paper's Qwen3-30B-A3B + 1.3B ViT) is
   printed as a reference for the paper's speed-up.

Reported per (P, M): the encoder's share of the step's work, step time over the bubble-free
lower bound (busiest rank's LLM work plus an even share of the encoder work: the same for every
layout), ``bigmac / ideal``, ``megatron / bigmac`` (the speed-up; the paper reports 1.08-1.9x),
and peak live encoder and LLM activations in microbatch units (busiest rank; LLM units are one
chunk's). Per-sample costs scale to the mix's sizes linearly plus the FLOP-derived attention;
the example's per-op overheads (milliseconds of Python on CPU) are kept.

Saves ``simulated_scale.png`` (efficiency, encoder peaks and speed-up against M) and the
live-activation pictures of bigmac and ideal at P=8, M=128 into ``--out``. The last line is
``{"bigmac_vs_ideal", "megatron_vs_bigmac"}`` at P=8, M=128 (step-time ratios, example costs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parent, _HERE):  # the example model (repository root) and the balancer benchmark's mix
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from balancer_quality import methods, naive_steps, realistic_mix  # noqa: E402

from balancer import BalancerConfig, Coefficients, Sample, SampleCostModel, Term  # noqa: E402
from balancer.metrics import schedule_costs  # noqa: E402
from lightning_bigmac.schedule import (  # noqa: E402
    Op,
    OpCosts,
    Simulation,
    build_plan,
    simulate,
)
from lightning_bigmac.schedule.costs import KIND_FIELD, PROFILE_FORMAT  # noqa: E402
from lightning_bigmac.schedule.pictures import draw_memory, figure, save  # noqa: E402

SCHEDULES = ("bigmac", "ideal", "megatron")
HEADLINE = (8, 128)
"""(P, M) of the JSON line."""
PAPER_SPEEDUP = (1.08, 1.9)


# ---- 1. profile the example model -----------------------------------------------------------------
def profile_records(microbatches: int, seed: int) -> list[list[Any]]:
    """Records of the example's sources, grouped into microbatches of 1, 2, 4, ..., 32 samples."""
    from examples.mllm.sources import records

    sizes = [2 ** (j % 6) for j in range(microbatches)]
    per_source = -(-sum(sizes) // 2)
    pool = [
        r
        for pair in zip(*(records(s, seed, "train", per_source) for s in ("shapes", "photos")), strict=True)
        for r in pair
    ]
    out, at = [], 0
    for k in sizes:
        out.append(pool[at : at + k])
        at += k
    return out


def profile_worker(rank: int, groups_of_records: list[list[Any]], steps: int) -> list[list[dict]] | None:
    """On each of 2 ranks: ``steps`` bigmac steps of the example MLLM; rank 0 returns every step's events."""
    from dataclasses import asdict

    import torch

    from examples.mllm.collate import collate
    from examples.mllm.config import ModelConfig
    from examples.mllm.model import ExampleMLLM
    from lightning_bigmac.runtime import PipelineExecutor, PipelineGroups

    torch.manual_seed(0)
    cfg = ModelConfig()
    groups = PipelineGroups.create(2, 1)
    ex = PipelineExecutor(ExampleMLLM(cfg).pipeline_parts(), groups, profile=True, timeout=120.0)
    mbs = [collate(recs, cfg) for recs in groups_of_records]
    plan = build_plan("bigmac", pp=2, microbatches=len(mbs))
    per_step = []
    for _ in range(steps):
        for p in ex.parameters():
            p.grad = None
        ex.step(plan, mbs)
        events = ex.profiler.gather(groups.pipeline_group, dst=groups.pipeline_ranks[0])
        if events is not None:
            per_step.append([asdict(e) for e in events])
    return per_step if rank == 0 else None


def median_profile(per_step: Sequence[Sequence[dict]], microbatches: int) -> dict[str, Any]:
    """A ``bigmac-profile/1`` object whose op durations are the medians over the steps given."""
    durations: dict[tuple[int, str], list[float]] = {}
    for events in per_step:
        for e in events:
            durations.setdefault((e["rank"], e["op"]), []).append(e["end"] - e["start"])
    events = [
        {"rank": r, "op": op, "start": 0.0, "end": statistics.median(d)} for (r, op), d in durations.items()
    ]
    return {"format": PROFILE_FORMAT, "pp": 2, "vpp": 1, "microbatches": microbatches, "events": events}


_FIELD_MODULE = {"encoder_forward": "encoder", "encoder_backward": "encoder", "llm_forward": "llm",
                 "llm_backward": "llm", "generator": "generator"}  # fmt: skip


def attention_ratios(cfg: Any) -> dict[str, float]:
    """Quadratic over linear cost per op kind, from FLOPs (the derivation of ``balancer/cost.py``).

    A block's matmuls cost ``24 d**2`` FLOPs per unit forward; attention ``4 d`` per (query, key)
    pair, half the pairs under a causal mask. The example's generator is an MLP (no attention).
    The profile cannot measure these: its spans (<= 64 patches, ~100 tokens) keep attention
    under a few percent of an op, below the machine's noise.
    """
    encoder = 4 * cfg.encoder_dim / (24 * cfg.encoder_dim**2)
    llm = 2 * cfg.dim / (24 * cfg.dim**2)
    return {"encoder_forward": encoder, "encoder_backward": encoder, "llm_forward": llm,
            "llm_backward": llm, "generator": 0.0}  # fmt: skip


def fit_terms(
    profile: dict[str, Any],
    microbatches: Sequence[Sequence[Sample]],
    example: SampleCostModel,
    ratios: dict[str, float],
) -> Coefficients:
    """Per op kind: overhead + linear by least squares on the profile, quadratic = linear x ``ratios``.

    An LLM microbatch's duration is the sum of its forward (or backward) over every chunk. A kind
    with fewer than two microbatches that have work for it cannot be fitted and costs nothing.
    """
    durations: dict[str, dict[int, float]] = {name: {} for name in KIND_FIELD.values()}
    for ev in profile["events"]:
        op = Op.parse(ev["op"])
        seen = durations[KIND_FIELD[op.kind]]
        seen[op.microbatch] = seen.get(op.microbatch, 0.0) + ev["end"] - ev["start"]
    units = [example.units(mb) for mb in microbatches]
    terms = {}
    for name, seen in durations.items():
        rows = [j for j in sorted(seen) if units[j][_FIELD_MODULE[name]]]
        if len(rows) < 2:
            terms[name] = Term()
            continue
        x = np.array([[1.0, sum(units[j][_FIELD_MODULE[name]])] for j in rows])
        overhead, linear = np.clip(np.linalg.lstsq(x, [seen[j] for j in rows], rcond=None)[0], 0.0, None)
        terms[name] = Term(
            overhead=float(overhead), linear=float(linear), quadratic=float(linear * ratios[name])
        )
    return Coefficients(**terms)


def profile_example(microbatches: int, steps: int, seed: int) -> tuple[Coefficients, dict[str, Any]]:
    """Real 2-process profile of the example MLLM -> per-sample cost terms in seconds (example units)."""
    from examples.mllm.collate import balancer_config, describe, metadata_with_sizes
    from examples.mllm.config import DataConfig, ModelConfig
    from lightning_bigmac.testing.spawn import run

    cfg = ModelConfig()
    grouped = profile_records(microbatches, seed)
    per_step = run(profile_worker, 2, grouped, steps, timeout=120.0)[0]
    profile = median_profile(per_step[1:] if len(per_step) > 1 else per_step, microbatches)
    samples = [[describe(r.key, metadata_with_sizes(r), cfg) for r in recs] for recs in grouped]
    example = balancer_config(DataConfig(), cfg).cost_model
    return fit_terms(profile, samples, example, attention_ratios(cfg)), profile


# ---- 2./3. cost the mix, pack it, simulate -------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One (P, M): the three layouts' simulations of the same packed step."""

    pp: int
    microbatches: int
    sims: dict[str, Simulation]
    encoder_share: float
    """Encoder work over all work of the step (what megatron's stage 0 pays alone)."""

    def ratio(self, a: str, b: str) -> float:
        return self.sims[a].step_time / self.sims[b].step_time

    def efficiency(self, schedule: str) -> float:
        """Lower bound over step time (1.0: no bubbles, perfectly balanced)."""
        sim = self.sims[schedule]
        return sim.lower_bound / sim.step_time

    def peak(self, schedule: str, module: str) -> int:
        return max(self.sims[schedule].peak_live[module])


def packed_step(
    model: SampleCostModel, pp: int, m: int, token_cap: int, seed: int
) -> tuple[list[list[Sample]], list[int]]:
    """One step of the mix (the samples naive packing would take), packed by the balancer; plus owners."""
    config = BalancerConfig(pipeline_size=pp, microbatches=m, token_cap=token_cap, cost_model=model)
    samples = realistic_mix(m * 12, seed)
    tokens = [model.cost(s).tokens for s in samples]
    step = naive_steps(tokens, m, token_cap)[0]
    plan, _ = methods(samples, config)["ours"](step)
    return [[samples[i] for i in mb] for mb in plan.microbatches], list(plan.owners)


def simulate_layouts(costs: OpCosts, owners: Sequence[int], pp: int, vpp: int) -> dict[str, Simulation]:
    """bigmac, ideal (the balancer's owners) and megatron (encoder in stage 0) on the same costs."""
    m = len(owners)
    encoder, generator = any(costs.encoder_forward), any(costs.generator)
    sims = {}
    for schedule in SCHEDULES:
        extra = {"owners": list(owners)} if schedule != "megatron" else {}
        plan = build_plan(
            schedule,
            pp=pp,
            vpp=vpp,
            microbatches=m,
            costs=costs,
            encoder=encoder,
            generator=generator,
            **extra,
        )
        sims[schedule] = simulate(plan, costs, check=False)
    return sims


def encoder_share(costs: OpCosts, vpp: int, pp: int) -> float:
    """Encoder work over all work of the step (what megatron's stage 0 pays alone)."""
    enc = sum(costs.encoder_forward) + sum(costs.encoder_backward)
    llm = (sum(costs.llm_forward) + sum(costs.llm_backward)) * pp * vpp
    return enc / (enc + llm + sum(costs.generator))


def sweep(
    model: SampleCostModel,
    pps: Sequence[int],
    microbatches: Sequence[int],
    vpp: int,
    token_cap: int,
    seed: int,
) -> list[Point]:
    """Every (P, M): one step of the mix packed by the balancer, simulated under each layout."""
    points = []
    for pp in pps:
        for m in microbatches:
            mbs, owners = packed_step(model, pp, m, token_cap, seed)
            costs = schedule_costs(mbs, model, pp=pp, vpp=vpp)
            points.append(
                Point(pp, m, simulate_layouts(costs, owners, pp, vpp), encoder_share(costs, vpp, pp))
            )
    return points


# ---- output ----------------------------------------------------------------------------------------
def print_coefficients(c: Coefficients) -> None:
    print("cost terms (microseconds; per patch, token or latent; quadratic per span, from FLOP ratios)")
    for name, term in c.to_dict().items():
        print(
            f"  {name:18s} overhead {term['overhead'] * 1e6:9.1f}  linear {term['linear'] * 1e6:8.3f}"
            f"  quadratic {term['quadratic'] * 1e6:10.6f}"
        )


def print_table(points: Sequence[Point]) -> None:
    """Step time over the lower bound, the ratios, and peak live units (busiest rank) per layout."""
    print(
        f"{'P':>3s}{'M':>5s}{'enc work':>9s}  step/LB: {'bigmac':>7s}{'ideal':>7s}{'megatron':>9s}"
        f"{'bigmac/ideal':>14s}{'megatron/bigmac':>17s}   peak enc (b/i/m)   peak llm (b/i/m)"
    )
    for pt in points:
        lb = "".join(f"{1 / pt.efficiency(s):{w}.3f}" for s, w in zip(SCHEDULES, (7, 7, 9), strict=True))
        enc = "/".join(str(pt.peak(s, "encoder")) for s in SCHEDULES)
        llm = "/".join(str(pt.peak(s, "llm")) for s in SCHEDULES)
        print(
            f"{pt.pp:3d}{pt.microbatches:5d}{pt.encoder_share:9.1%}           {lb}"
            f"{pt.ratio('bigmac', 'ideal'):14.4f}{pt.ratio('megatron', 'bigmac'):17.3f}"
            f"   {enc:>16s}   {llm:>16s}"
        )


def plot(settings: dict[str, list[Point]], path: Path) -> Path:
    """Per P: step time / lower bound and peak live encoder microbatches against M (first setting),
    and megatron's step over bigmac's for every setting against the paper's range."""
    first, points = next(iter(settings.items()))
    pps = sorted({pt.pp for pt in points})
    fig = figure(figsize=(5 * len(pps), 9.5))
    axes = fig.subplots(3, len(pps), squeeze=False)
    for col, pp in enumerate(pps):
        mine = [pt for pt in points if pt.pp == pp]
        ms = [pt.microbatches for pt in mine]
        for s in SCHEDULES:
            axes[0, col].plot(ms, [1 / pt.efficiency(s) for pt in mine], marker="o", label=s)
            axes[1, col].plot(ms, [pt.peak(s, "encoder") for pt in mine], marker="o", label=s)
        for name, pts in settings.items():
            ys = [pt.ratio("megatron", "bigmac") for pt in pts if pt.pp == pp]
            axes[2, col].plot(ms, ys, marker="o", label=f"{name} costs")
        axes[2, col].axhspan(*PAPER_SPEEDUP, color="grey", alpha=0.2, label="paper's 1.08-1.9x")
        axes[2, col].set_yscale("log")
        axes[0, col].set_title(f"P={pp}: step time / lower bound ({first} costs)", fontsize=9)
        axes[1, col].set_title(f"P={pp}: peak live encoder microbatches, busiest rank", fontsize=9)
        axes[2, col].set_title(f"P={pp}: megatron step / bigmac step", fontsize=9)
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ms, [str(m) for m in ms])
            ax.set_xlabel("microbatches per step M")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[1, col].set_ylim(bottom=0)
    fig.suptitle("simulated scale on the balancer's mix (V=2)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def at_headline(points: Sequence[Point]) -> Point:
    return next((p for p in points if (p.pp, p.microbatches) == HEADLINE), points[0])


def headline(points: Sequence[Point]) -> dict[str, float]:
    pt = at_headline(points)
    return {
        "bigmac_vs_ideal": round(pt.ratio("bigmac", "ideal"), 4),
        "megatron_vs_bigmac": round(pt.ratio("megatron", "bigmac"), 4),
    }


def summary(name: str, points: Sequence[Point]) -> None:
    speedups = [pt.ratio("megatron", "bigmac") for pt in points]
    worst = max(pt.ratio("bigmac", "ideal") for pt in points)
    print(
        f"{name}: megatron / bigmac {min(speedups):.2f}-{max(speedups):.2f}x (paper: "
        f"{PAPER_SPEEDUP[0]}-{PAPER_SPEEDUP[1]}x); bigmac / ideal at most {worst:.4f} (target <= 1.02)"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pps", type=int, nargs="+", default=[8, 16], help="pipeline sizes P simulated")
    parser.add_argument("--vpp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--token-cap", type=int, default=8192)
    parser.add_argument("--profile-microbatches", type=int, default=24)
    parser.add_argument("--profile-steps", type=int, default=4, help="profiled steps (the first warms up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    coefficients, profile = profile_example(args.profile_microbatches, args.profile_steps, args.seed)
    print(
        f"profile: example MLLM (examples/mllm, default ModelConfig), bigmac P=2 "
        f"M={args.profile_microbatches}, {len(profile['events'])} ops, medians over "
        f"{max(1, args.profile_steps - 1)} steps; {time.perf_counter() - t0:.1f} s"
    )
    print_coefficients(coefficients)
    models = {
        "example": SampleCostModel(coefficients=coefficients, llm_attention="sample"),
        "paper": SampleCostModel(),  # the balancer's defaults: FLOP ratios of Qwen3-30B-A3B + 1.3B ViT
    }
    settings: dict[str, list[Point]] = {}
    for name, model in models.items():
        t1 = time.perf_counter()
        settings[name] = sweep(model, args.pps, args.microbatches, args.vpp, args.token_cap, args.seed)
        print(
            f"\n{name} costs, balancer mix, V={args.vpp}, token cap {args.token_cap}; "
            f"{time.perf_counter() - t1:.1f} s"
        )
        print_table(settings[name])
    print()
    for name, points in settings.items():
        summary(name, points)
    path = plot(settings, args.out / "simulated_scale.png")
    pt = at_headline(settings["example"])
    pictures = [
        draw_memory(
            pt.sims[s], args.out / f"simulated_scale_memory_{s}.png", f"{s}, P={pt.pp}, M={pt.microbatches}"
        )
        for s in ("bigmac", "ideal")
    ]
    print(f"plots: {path}, " + ", ".join(str(p) for p in pictures))
    figures = headline(settings["example"])
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
