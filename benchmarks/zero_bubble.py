"""Zero-bubble nested columns: ``bigmac_zb`` against ``bigmac``, ``ideal`` and ``megatron``.

    python benchmarks/zero_bubble.py [--steps 10] [--microbatches 16] [--samples 4] [--out DIR]

1. **Real run** (2 gloo processes, one thread each): the example MLLM (``examples/mllm``, default
   ``ModelConfig``) runs ``bigmac`` and ``bigmac_zb`` steps alternately on the same microbatches
   (``--microbatches`` of ``--samples`` records of the example's sources each), with the same
   weights (no optimizer step), so both see the same machine load. Each schedule's first step is
   profiled and its plan re-made with that profile (``costs="profile"``, as the example's CPU
   config). Reported: median step wall time of each over the ``--steps`` after that, the largest
   gradient difference between the two, and what the split costs on CPU (``I + W`` over ``B``,
   ``GI + GW`` over ``G``, per-kind medians).
2. **Simulated**: step time over the bubble-free lower bound (busiest rank's LLM work plus an even
   share of encoder and generator work) for the real run's P=2 V=1 M=16, P=4 V=1 M=16 and 32,
   P=4 V=2 M=16 and 32 and P=8 V=2 M=32..128, with the default unit costs and with the example's
   profiled costs (the real run's per-kind medians of bigmac's ops, the split's shares from
   bigmac_zb's; LLM op times scaled by 2/(P V) from the profile's two stages, encoder, generator
   and transfer latency kept), once
   with the split free (``I + W = B``) and once ("+split") with bigmac_zb's own measured ``I``,
   ``W``, ``GI`` and ``GW`` times, over the same bound. Peak live microbatches per module on the
   busiest rank. Where bigmac_zb's step stays above 1.02 of the bound with default costs, or
   is no faster than bigmac's with the profiled costs and a free split, its idle time and what
   each gap waits for.
3. **Memory as M grows**: bigmac_zb's encoder, generator and LLM peaks at M = 4P..32P.

The last line is ``{"zb_vs_bound_m4p", "bigmac_vs_bound_m4p", "zb_encoder_growth",
"zb_llm_peak_over_bigmac"}``: P=4 V=1 M=16 with default costs; the growth is the encoder peak at
M=32P over M=4P (P=4, V=1); the last is bigmac_zb's LLM peak minus bigmac's (microbatch units of
one chunk, busiest rank).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # the example model
    sys.path.insert(0, str(_ROOT))

from lightning_bigmac.schedule import OpCosts, Plan, Simulation, build_plan, simulate  # noqa: E402
from lightning_bigmac.schedule.costs import PROFILE_FORMAT  # noqa: E402
from lightning_bigmac.schedule.dataflow import DataFlow  # noqa: E402
from lightning_bigmac.schedule.pictures import draw_gantt  # noqa: E402

SCHEDULES = ("bigmac_zb", "bigmac", "ideal", "megatron")
LAYOUTS = ((2, 1, 16), (4, 1, 16), (4, 1, 32), (4, 2, 16), (4, 2, 32), (8, 2, 32), (8, 2, 64), (8, 2, 128))
"""P=2, M=16 is the real run's layout (its simulated steps predict the measured ones)."""
TARGETS = {4: 1.03, 8: 1.02}
"""Step over the lower bound at M = 4P and M = 8P (P=4, V=1 and V=2)."""
HEADLINE = (4, 1, 16)
PROFILED_AT = 2
"""Stages of the real run (P=2, V=1): a profiled LLM op is half the LLM."""


# ---- 1. the real run -------------------------------------------------------------------------------
def step_records(microbatches: int, samples: int, seed: int) -> list[list[Any]]:
    """Records of the example's sources (shapes and photos alternating), ``samples`` per microbatch."""
    from examples.mllm.sources import records

    half = -(-microbatches * samples // 2)
    pool = [
        r
        for pair in zip(*(records(s, seed, "train", half) for s in ("shapes", "photos")), strict=True)
        for r in pair
    ]
    return [pool[j * samples : (j + 1) * samples] for j in range(microbatches)]


def real_worker(rank: int, grouped: list[list[Any]], steps: int) -> dict[str, Any]:
    """On each of 2 ranks: alternate bigmac and bigmac_zb steps of the example MLLM.

    Returns, on pipeline rank 0, every step's schedule, wall time and events; on every rank the
    largest difference between the two schedules' gradients (relative to the largest gradient).
    """
    import torch
    import torch.distributed as dist

    from examples.mllm.collate import collate
    from examples.mllm.config import ModelConfig
    from examples.mllm.model import ExampleMLLM
    from lightning_bigmac.runtime import PipelineExecutor, PipelineGroups, planning_costs

    torch.manual_seed(0)
    cfg = ModelConfig()
    groups = PipelineGroups.create(2, 1)
    ex = PipelineExecutor(ExampleMLLM(cfg).pipeline_parts(), groups, profile=True, timeout=300.0)
    mbs = [collate(recs, cfg) for recs in grouped]
    plans = [build_plan(s, pp=2, microbatches=len(mbs)) for s in ("bigmac", "bigmac_zb")]
    records, grads, worst = [], {}, 0.0
    for step in range(2 * (steps + 1)):
        plan = plans[step % 2]
        for p in ex.parameters():
            p.grad = None
        ex.step(plan, mbs)
        wall = ex.profiler.now()
        got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in ex.parameters()]
        grads.setdefault(plan.schedule, got)
        other = grads.get("bigmac" if plan.schedule == "bigmac_zb" else "bigmac_zb")
        if other is not None:
            scale = max(float(g.abs().max()) for g in other)
            worst = max(worst, *(float((a - b).abs().max()) / scale for a, b in zip(got, other, strict=True)))
        events = ex.profiler.gather(groups.pipeline_group, dst=groups.pipeline_ranks[0])
        if events is not None:
            records.append({"schedule": plan.schedule, "wall": wall, "plan": plan.to_dict(),
                            "events": [dataclasses.asdict(e) for e in events]})  # fmt: skip
        if step < 2:  # re-plan with this schedule's first profile, as costs="profile" does
            box = [None if events is None else planning_costs(plan, events)]
            dist.broadcast_object_list(box, src=groups.pipeline_ranks[0], group=groups.pipeline_group)
            plans[step] = build_plan(plan.schedule, pp=2, microbatches=len(mbs), costs=box[0])
    return {"records": records if rank == 0 else None, "grad_diff": worst}


def median_costs(records: Sequence[dict[str, Any]]) -> OpCosts:
    """Per-kind means of the per-op medians over ``records`` (one schedule's timed steps)."""
    durations: dict[tuple[int, str], list[float]] = {}
    for rec in records:
        for e in rec["events"]:
            durations.setdefault((e["rank"], e["op"]), []).append(e["end"] - e["start"])
    events = [
        {"rank": r, "op": op, "start": 0.0, "end": statistics.median(d)} for (r, op), d in durations.items()
    ]
    latency = statistics.median(_latency(rec) for rec in records)
    return OpCosts.from_profile({"format": PROFILE_FORMAT, "latency": latency, "events": events}).typical()


def _latency(record: dict[str, Any]) -> float:
    from lightning_bigmac.runtime import OpEvent, transfer_latency

    return transfer_latency(Plan.from_dict(record["plan"]), [OpEvent(**e) for e in record["events"]])


def real_run(microbatches: int, samples: int, steps: int, seed: int) -> dict[str, Any]:
    """Run the alternation on 2 processes; per schedule the median wall time and profiled costs."""
    from lightning_bigmac.testing.spawn import run

    grouped = step_records(microbatches, samples, seed)
    results = run(real_worker, 2, grouped, steps, timeout=1800.0)
    records = results[0]["records"]
    out: dict[str, Any] = {"grad_diff": max(r["grad_diff"] for r in results)}
    for schedule in ("bigmac", "bigmac_zb"):
        timed = [r for r in records if r["schedule"] == schedule][
            1:
        ]  # the first step planned with unit costs
        out[schedule] = {
            "wall": statistics.median(r["wall"] for r in timed),
            "walls": [r["wall"] for r in timed],
            "costs": median_costs(timed),
            "knobs": timed[-1]["plan"]["knobs"],
        }
    return out


def profiled_costs(real: dict[str, Any]) -> tuple[OpCosts, OpCosts]:
    """The example's costs: bigmac's op times (the whole backward) and, for bigmac_zb, the same with
    its own measured split (``I + W`` for ``B``, ``GI + GW`` for ``G``, and their shares)."""
    whole, split = real["bigmac"]["costs"], real["bigmac_zb"]["costs"]
    shares = {
        "llm_weight_share": split.llm_weight_share,
        "generator_weight_share": split.generator_weight_share,
    }
    base = dataclasses.replace(whole, **shares)
    return base, dataclasses.replace(base, llm_backward=split.llm_backward, generator=split.generator)


# ---- 2./3. simulate ----------------------------------------------------------------------------------
def scaled(costs: OpCosts, pp: int, vpp: int) -> OpCosts:
    """``costs`` for ``pp * vpp`` stages: LLM ops cut from the profile's stages to this many."""
    f = PROFILED_AT / (pp * vpp)
    return dataclasses.replace(costs, llm_forward=costs.llm_forward * f, llm_backward=costs.llm_backward * f)


@dataclasses.dataclass(frozen=True)
class Row:
    """One layout under one cost setting: every schedule's simulation of the same step."""

    pp: int
    vpp: int
    microbatches: int
    costs: str
    sims: dict[str, Simulation]

    @property
    def bound(self) -> float:
        """The unsplit step's lower bound (bigmac's), shared by every schedule."""
        return self.sims["bigmac"].lower_bound

    def over_bound(self, schedule: str) -> float:
        return self.sims[schedule].step_time / self.bound

    def peak(self, schedule: str, module: str) -> int:
        return max(self.sims[schedule].peak_live[module])


def simulate_layout(
    pp: int, vpp: int, m: int, name: str, costs: OpCosts, split: OpCosts | None = None
) -> Row:
    """Every schedule on one layout; bigmac_zb is planned and timed with ``split`` when given."""
    sims = {}
    for schedule in SCHEDULES:
        c = split if schedule == "bigmac_zb" and split is not None else costs
        sims[schedule] = simulate(
            build_plan(schedule, pp=pp, vpp=vpp, microbatches=m, costs=c), c, check=False
        )
    return Row(pp, vpp, m, name, sims)


def print_rows(rows: Sequence[Row]) -> None:
    print(
        f"{'P':>2} {'V':>2} {'M':>4} {'costs':>8}  step / lower bound: {'zb':>6}{'bigmac':>8}{'ideal':>7}"
        f"{'megatron':>9}  zb/ideal   enc peak z/b/i/m   gen z/b   llm z/b/m   zb K, d"
    )
    for r in rows:
        enc = "/".join(str(r.peak(s, "encoder")) for s in SCHEDULES)
        gen = "/".join(str(r.peak(s, "generator")) for s in SCHEDULES[:2])
        llm = "/".join(str(r.peak(s, "llm")) for s in ("bigmac_zb", "bigmac", "megatron"))
        knobs = r.sims["bigmac_zb"].plan.knobs
        caps = f"{knobs['held_columns']}, {knobs['weight_deferral']}"
        ratio = r.sims["bigmac_zb"].step_time / r.sims["ideal"].step_time
        steps = "".join(f"{r.over_bound(s):>{w}.3f}" for s, w in zip(SCHEDULES, (6, 8, 7, 9), strict=True))
        print(
            f"{r.pp:>2} {r.vpp:>2} {r.microbatches:>4} {r.costs:>8}  {'':20}{steps}"
            f"  {ratio:>8.3f}   {enc:>16}   {gen:>7}   {llm:>9}   {caps}"
        )


def idle_report(sim: Simulation, limit: int = 6) -> list[str]:
    """The longest idle gaps of a simulated step, each with the op that ends it and what that op
    waited for (its last producer to finish), or the op the step's end waits for."""
    flow, lat = DataFlow.of_plan(sim.plan), sim.costs.latency
    end = {(iv.rank, iv.op): iv.end for row in sim.intervals for iv in row}
    gaps = []
    for row in sim.intervals:
        t = 0.0
        for iv in row:
            if iv.start > t + 1e-9:
                srcs = sorted(flow.producers(iv.rank, iv.op), key=lambda s: end[s])
                why = (
                    f"{srcs[-1][1]}@PP{srcs[-1][0]} (ends {end[srcs[-1]]:.4g}, +{lat:.3g} transfer)"
                    if srcs
                    else "?"
                )
                gaps.append(
                    (iv.start - t, f"PP{iv.rank} idle {t:.4g}-{iv.start:.4g} before {iv.op}: waits for {why}")
                )
            t = iv.end
        if sim.step_time > t + 1e-9:
            last = max((iv for r in sim.intervals for iv in r), key=lambda iv: iv.end)
            ends = f"the step ends with {last.op}@PP{last.rank}"
            gaps.append(
                (sim.step_time - t, f"PP{row[-1].rank} idle {t:.4g}-{sim.step_time:.4g} at the end: {ends}")
            )
    total = [sum(g for g, text in gaps if text.startswith(f"PP{r} ")) for r in range(sim.plan.pp)]
    lines = [f"idle per rank: {', '.join(f'{x:.4g}' for x in total)} (step {sim.step_time:.4g})"]
    return lines + [text for _, text in sorted(gaps, key=lambda g: -g[0])[:limit]]


def growth(pp: int, vpp: int, costs: OpCosts) -> dict[str, list[int]]:
    """bigmac_zb's peaks (busiest rank) per module at M = 4P, 8P, 16P, 32P."""
    peaks: dict[str, list[int]] = {"encoder": [], "generator": [], "llm": []}
    for k in (4, 8, 16, 32):
        sim = simulate(
            build_plan("bigmac_zb", pp=pp, vpp=vpp, microbatches=k * pp, costs=costs), costs, check=False
        )
        for module in peaks:
            peaks[module].append(max(sim.peak_live[module]))
    return peaks


def check_targets(rows: Sequence[Row]) -> list[str]:
    """What ``bigmac_zb`` is built to reach on the default-cost rows (step / bound at M=4P and 8P,
    LLM peak within one group of bigmac's), each with its verdict."""
    lines = []
    for r in rows:
        k = r.microbatches // r.pp
        if r.costs == "default" and r.pp == 4 and k in TARGETS:
            got = r.over_bound("bigmac_zb")
            verdict = "met" if got <= TARGETS[k] + 1e-9 else "MISSED"
            lines.append(
                f"P=4 V={r.vpp} M={k}P: bigmac_zb step / bound {got:.3f} (target <= {TARGETS[k]}): {verdict}"
            )
        if r.costs == "default":
            extra = r.peak("bigmac_zb", "llm") - r.peak("bigmac", "llm")
            if extra > r.pp:
                where = f"P={r.pp} V={r.vpp} M={r.microbatches}"
                lines.append(f"{where}: LLM peak {extra} over bigmac's (target <= {r.pp}): MISSED")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per schedule in the real run")
    parser.add_argument("--microbatches", type=int, default=16, help="M of the real run (P=2)")
    parser.add_argument("--samples", type=int, default=4, help="records per microbatch in the real run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    real = real_run(args.microbatches, args.samples, args.steps, args.seed)
    b, z = real["bigmac"], real["bigmac_zb"]
    print(
        f"real run: example MLLM, P=2, M={args.microbatches} ({args.samples} records each), {args.steps} "
        f"alternated steps per schedule after a profiled one; {time.perf_counter() - t0:.0f} s"
    )
    for name, r in (("bigmac", b), ("bigmac_zb", z)):
        walls = ", ".join(f"{w * 1e3:.0f}" for w in r["walls"])
        print(f"  {name:9s} median step {r['wall'] * 1e3:7.1f} ms  knobs {r['knobs']}  (steps: {walls} ms)")
    print(f"  bigmac_zb / bigmac wall time: {z['wall'] / b['wall']:.3f}; largest gradient difference "
          f"{real['grad_diff']:.1e} of the largest gradient")  # fmt: skip
    bc, zc = b["costs"], z["costs"]
    for name, whole, part, share in (("I + W", "B", "llm_backward", "llm_weight_share"),
                                     ("GI + GW", "G", "generator", "generator_weight_share")):  # fmt: skip
        split, one = getattr(zc, part), getattr(bc, part)
        print(
            f"  split on CPU: {name} = {split * 1e3:.2f} ms against {whole} = {one * 1e3:.2f} ms "
            f"({split / one - 1:+.1%}), weight share {getattr(zc, share):.2f}"
        )
    print(f"  profiled costs (ms): F {bc.llm_forward * 1e3:.2f}  B {bc.llm_backward * 1e3:.2f}  EF "
          f"{bc.encoder_forward * 1e3:.2f}  EB {bc.encoder_backward * 1e3:.2f}  G {bc.generator * 1e3:.2f}  "
          f"latency {bc.latency * 1e3:.2f}")  # fmt: skip

    profiled, profiled_split = profiled_costs(real)
    rows = [simulate_layout(p, v, m, "default", OpCosts()) for p, v, m in LAYOUTS]
    rows += [simulate_layout(p, v, m, "profiled", scaled(profiled, p, v)) for p, v, m in LAYOUTS]
    rows += [
        simulate_layout(p, v, m, "+split", scaled(profiled, p, v), scaled(profiled_split, p, v))
        for p, v, m in LAYOUTS
    ]
    print(
        "\nsimulated (z/b/i/m = bigmac_zb/bigmac/ideal/megatron; peaks on the busiest rank, LLM per chunk;"
        "\n'profiled': the example's op times with bigmac_zb's I + W = B (a free split), '+split':"
        "\nbigmac_zb with its own measured I, W, GI, GW, over the same bound)"
    )
    print_rows(rows)
    print()
    for line in check_targets(rows):
        print(line)
    for r in rows:
        zb = r.over_bound("bigmac_zb")
        if (r.costs == "default" and zb > 1.02) or (r.costs == "profiled" and zb >= r.over_bound("bigmac")):
            print(f"\nwhere bigmac_zb idles at P={r.pp} V={r.vpp} M={r.microbatches} ({r.costs} costs):")
            print("\n".join("  " + line for line in idle_report(r.sims["bigmac_zb"])))

    print("\nbigmac_zb peaks as M grows (default costs; M = 4P, 8P, 16P, 32P; growth = 32P over 4P)")
    grown = {}
    for p, v in ((4, 1), (4, 2), (8, 2)):
        grown[(p, v)] = peaks = growth(p, v, OpCosts())
        text = "   ".join(f"{m} {'/'.join(map(str, xs))} ({xs[-1] / xs[0]:.2f})" for m, xs in peaks.items())
        print(f"  P={p} V={v}: {text}")

    head = next(r for r in rows if (r.pp, r.vpp, r.microbatches, r.costs) == (*HEADLINE, "default"))
    path = draw_gantt(head.sims["bigmac_zb"], args.out / "zero_bubble_p4_m16.png")
    print(f"\nGantt chart of bigmac_zb at P=4 V=1 M=16: {path}")
    enc = grown[(4, 1)]["encoder"]
    figures = {
        "zb_vs_bound_m4p": round(head.over_bound("bigmac_zb"), 4),
        "bigmac_vs_bound_m4p": round(head.over_bound("bigmac"), 4),
        "zb_encoder_growth": round(enc[-1] / enc[0], 2),
        "zb_llm_peak_over_bigmac": head.peak("bigmac_zb", "llm") - head.peak("bigmac", "llm"),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
