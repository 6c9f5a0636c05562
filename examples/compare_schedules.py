"""Compare every schedule on one step, from Python: the planner needs no GPU and no torch.

    python examples/compare_schedules.py [--pp 4] [--vpp 2] [--microbatches 32] [--encoder-share 0.3]

Builds each schedule for the same step, with encoder work set to a share of the total, prints
step time against the bubble-free lower bound and the peak live activations, and draws every
Gantt chart into runs/compare/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_bigmac.schedule import SCHEDULES, OpCosts, build_plan, simulate
from lightning_bigmac.schedule.pictures import draw_gantt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--vpp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=32)
    parser.add_argument("--encoder-share", type=float, default=0.3, help="encoder share of all work")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args()

    llm = 3.0 * args.pp * args.vpp  # forward 1 + backward 2 per chunk
    enc = args.encoder_share / (1 - args.encoder_share) * llm
    costs = OpCosts(encoder_forward=enc / 3, encoder_backward=2 * enc / 3, generator=0.0)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"pp={args.pp} vpp={args.vpp} M={args.microbatches}, encoder {args.encoder_share:.0%} of the work")
    print(f"{'schedule':<12} {'step':>8} {'vs bound':>9} {'encoder peak':>13} {'llm peak':>9}")
    for name in SCHEDULES:
        try:
            plan = build_plan(
                name, pp=args.pp, vpp=args.vpp, microbatches=args.microbatches, generator=False, costs=costs
            )
        except ValueError as err:  # e.g. 1f1b with vpp > 1
            print(f"{name:<12} skipped: {err}")
            continue
        sim = simulate(plan, costs)
        draw_gantt(sim, args.out / f"{name}.png")
        print(
            f"{name:<12} {sim.step_time:8.1f} {sim.step_time / sim.lower_bound:8.2f}x "
            f"{max(sim.peak_live['encoder']):13d} {max(sim.peak_live['llm']):9d}"
        )
    print(f"Gantt charts in {args.out}/")


if __name__ == "__main__":
    main()
