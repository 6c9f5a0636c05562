"""Activation memory against batch size: real multi-process runs of ``bigmac``, ``ideal`` and ``megatron``.

    python benchmarks/memory_vs_batch.py [--pp 2 4] [--vpp 1] [--multiples 4 8 16 32] [--out runs/benchmarks]

For every P in ``--pp``, every schedule and every M = k * P (k in ``--multiples``) one real step
runs on ``P`` gloo processes (one spawn per P) of the tiny test MLLM
(:class:`~lightning_bigmac.testing.tiny_mllm.TinyMLLM`, default sizes) on equal microbatches
(3 images, 12 tokens each: the ``"equal"`` scenario data), so every microbatch's activations
weigh the same and any growth is the schedule's doing. The executor's
:class:`~lightning_bigmac.runtime.memory.ActivationMeter` counts the bytes autograd saves for
backward per module per rank, exactly (``saved_tensors_hooks``); the step's peak per module per
rank is reported, next to the simulator's prediction for the same plan (peak microbatch units
times the measured unit), which must agree.

The paper's claim is that BigMac's encoder and generator memory stay flat as the batch grows
(at most W encoder microbatches and one generator microbatch alive per rank), whereas the ideal
layout (every encoder forward first, every encoder backward last) keeps O(M/P) encoder
microbatches alive. ``megatron`` (encoder inside stage 0, generator inside the last stage) is
flat too, bounded by 1F1B's depth: it pays in compute instead (``simulated_scale.py``).

Growth is peak at the largest M over peak at the smallest, on the busiest rank (the rank with
the largest peak at the largest M). The script saves a plot of the busiest rank's peak per module
against M, one row per P (``memory_vs_batch.png``), and ends with
``{"bigmac_encoder_growth", "bigmac_generator_growth", "ideal_encoder_growth"}`` at the largest P.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_bigmac.schedule import simulate
from lightning_bigmac.schedule.pictures import figure, save
from lightning_bigmac.schedule.plan import MODULES
from lightning_bigmac.testing.scenarios import build_case_plan, run_cases
from lightning_bigmac.testing.spawn import run

SCHEDULES = ("bigmac", "ideal", "megatron")
UNIT_KIND = {"encoder": "EF", "llm": "F", "generator": "G"}
"""The forward op kind whose saved bytes make one unit of a module (the meter's unit keys)."""

Peaks = dict[tuple[str, int], list[dict[str, Any]]]
"""``(schedule, M) -> per rank {"peak": {module: bytes}, "units": {(kind, mb, chunk): bytes}}``."""


def memory_cases(schedules: Sequence[str], microbatches: Sequence[int]) -> list[dict[str, Any]]:
    """One memory-measuring scenario per schedule and M, on equal microbatches."""
    return [
        {"schedule": s, "microbatches": m, "data": "equal", "measure": "memory"}
        for s in schedules
        for m in microbatches
    ]


def measure(pp: int, vpp: int, schedules: Sequence[str], microbatches: Sequence[int]) -> Peaks:
    """Run every case on ``pp`` fresh processes (one spawn: start-up dominates on 2 cores)."""
    cases = memory_cases(schedules, microbatches)
    per_rank = run(run_cases, pp, pp, 1, vpp, cases, timeout=120.0)
    return {(c["schedule"], c["microbatches"]): [r[i] for r in per_rank] for i, c in enumerate(cases)}


def predicted_peak(schedule: str, m: int, pp: int, vpp: int, rank_result: dict, rank: int) -> dict[str, int]:
    """The simulator's peak (microbatch units) times the unit this rank measured, per module.

    With equal microbatches every unit of a module weighs the same, so this must equal the meter.
    """
    case = {"schedule": schedule, "microbatches": m, "data": "equal"}
    live = simulate(build_case_plan(case, pp, vpp), check=False).peak_live
    out = {}
    for module in MODULES:
        units = [b for (kind, _, _), b in rank_result["units"].items() if kind == UNIT_KIND[module]]
        out[module] = live[module][rank] * max(units, default=0)
    return out


def busiest_rank(peaks: Peaks, schedule: str, module: str, m: int) -> int:
    """The rank holding the most of ``module``'s activations at M = ``m``."""
    row = [r["peak"][module] for r in peaks[(schedule, m)]]
    return max(range(len(row)), key=row.__getitem__)


def growth(peaks: Peaks, schedule: str, module: str, lo: int, hi: int) -> float:
    """Peak at M = ``hi`` over peak at M = ``lo`` on the busiest rank (1.0: flat)."""
    rank = busiest_rank(peaks, schedule, module, hi)
    small, big = (peaks[(schedule, m)][rank]["peak"][module] for m in (lo, hi))
    return big / small if small else float("nan")


def mismatches(peaks: Peaks, pp: int, vpp: int) -> list[str]:
    """Every (schedule, M, rank, module) where the meter and the simulator disagree."""
    bad = []
    for (schedule, m), ranks in peaks.items():
        for rank, res in enumerate(ranks):
            want = predicted_peak(schedule, m, pp, vpp, res, rank)
            bad += [
                f"{schedule} M={m} rank {rank} {mod}: measured {res['peak'][mod]}, simulated {want[mod]}"
                for mod in MODULES
                if res["peak"][mod] != want[mod]
            ]
    return bad


def print_table(peaks: Peaks, schedules: Sequence[str], microbatches: Sequence[int]) -> None:
    """Peak KiB per module on the busiest rank (at the largest M) and, per rank, the encoder peak."""
    hi = microbatches[-1]
    print(
        f"{'schedule':10s}{'M':>5s}" + "".join(f"{m + ' KiB':>15s}" for m in MODULES) + "   encoder per rank"
    )
    for s in schedules:
        for m in microbatches:
            row = peaks[(s, m)]
            cells = [row[busiest_rank(peaks, s, mod, hi)]["peak"][mod] / 1024 for mod in MODULES]
            per_rank = ", ".join(f"{r['peak']['encoder'] / 1024:.1f}" for r in row)
            print(f"{s:10s}{m:5d}" + "".join(f"{c:15.1f}" for c in cells) + f"   [{per_rank}]")


def plot(runs: dict[int, Peaks], schedules: Sequence[str], multiples: Sequence[int], path: Path) -> Path:
    """Busiest rank's peak per module against M, one line per schedule, one row per P: the paper's
    'memory stays flat as batch grows' picture."""
    fig = figure(figsize=(4.2 * len(MODULES), 3.3 * len(runs)))
    axes = fig.subplots(len(runs), len(MODULES), squeeze=False)
    for row, (pp, peaks) in zip(axes, runs.items(), strict=True):
        microbatches = [k * pp for k in multiples]
        for ax, module in zip(row, MODULES, strict=True):
            for s in schedules:
                rank = busiest_rank(peaks, s, module, microbatches[-1])
                ys = [peaks[(s, m)][rank]["peak"][module] / 1024 for m in microbatches]
                ax.plot(microbatches, ys, marker="o", label=f"{s} (PP{rank})")
            ax.set_xscale("log", base=2)
            ax.set_xticks(microbatches, [f"{k}P" for k in multiples])
            ax.set_xlabel(f"microbatches per step M (P={pp})")
            ax.set_ylabel("peak saved activations (KiB)")
            ax.set_title(f"{module}, P={pp}", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("activation memory vs batch size (busiest rank, measured)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def headline(peaks: Peaks, microbatches: Sequence[int]) -> dict[str, float]:
    lo, hi = microbatches[0], microbatches[-1]
    return {
        "bigmac_encoder_growth": round(growth(peaks, "bigmac", "encoder", lo, hi), 4),
        "bigmac_generator_growth": round(growth(peaks, "bigmac", "generator", lo, hi), 4),
        "ideal_encoder_growth": round(growth(peaks, "ideal", "encoder", lo, hi), 4),
    }


def report(peaks: Peaks, pp: int, vpp: int, schedules: Sequence[str], microbatches: Sequence[int]) -> None:
    """Print one P's table, the check against the simulator and the growth per schedule and module."""
    print_table(peaks, schedules, microbatches)
    bad = mismatches(peaks, pp, vpp)
    print(f"simulator prediction (peak units x measured unit) matches the meter: {'no' if bad else 'yes'}")
    for line in bad:
        print("  " + line)
    lo, hi = microbatches[0], microbatches[-1]
    print(f"growth M={lo} -> M={hi}, busiest rank (1.00: flat)")
    for s in schedules:
        cells = ", ".join(f"{mod} {growth(peaks, s, mod, lo, hi):.2f}" for mod in MODULES)
        print(f"  {s:10s}{cells}")


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline ranks P (processes)")
    parser.add_argument("--vpp", type=int, default=1, help="virtual chunks V (tiny model: pp * vpp <= 4)")
    parser.add_argument("--multiples", type=int, nargs="+", default=[4, 8, 16, 32], help="M / P values")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    args = parser.parse_args(argv)
    multiples = sorted(args.multiples)

    runs: dict[int, Peaks] = {}
    for pp in sorted(args.pp):
        microbatches = [k * pp for k in multiples]
        t0 = time.perf_counter()
        runs[pp] = measure(pp, args.vpp, args.schedules, microbatches)
        print(
            f"\nP={pp}: tiny MLLM on {pp} gloo processes, V={args.vpp}, equal microbatches "
            f"(peaks in KiB on the busiest rank at M={microbatches[-1]}); {time.perf_counter() - t0:.1f} s"
        )
        report(runs[pp], pp, args.vpp, args.schedules, microbatches)
    path = plot(runs, args.schedules, multiples, args.out / "memory_vs_batch.png")
    print(f"\nplot: {path}")
    pp = max(runs)
    figures = (
        headline(runs[pp], [k * pp for k in multiples]) if {"bigmac", "ideal"} <= set(args.schedules) else {}
    )
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
