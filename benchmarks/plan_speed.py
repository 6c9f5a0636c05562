"""How long planning + validating + simulating takes at scale (it should stay well under 2 s).

    python benchmarks/plan_speed.py [--pp 8] [--vpp 2] [--microbatches 256] [--repeats 5]

Times the default bigmac build (knob search included), the validator and the simulator on
one process, medians over repeats; the last line is {"seconds": <median total>}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from lightning_bigmac.schedule import build_plan, simulate, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=8)
    parser.add_argument("--vpp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    phases: dict[str, list[float]] = {"build (knob search)": [], "validate": [], "simulate": [], "total": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plan = build_plan("bigmac", pp=args.pp, vpp=args.vpp, microbatches=args.microbatches)
        t1 = time.perf_counter()
        validate(plan)
        t2 = time.perf_counter()
        sim = simulate(plan, check=False)
        t3 = time.perf_counter()
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            phases[name].append(dt)
    print(
        f"bigmac pp={args.pp} vpp={args.vpp} microbatches={args.microbatches}: {plan.num_ops()} ops, "
        f"W={plan.knobs['encoder_warmup']}, step time {sim.step_time:.0f} (unit costs)"
    )
    for name, values in phases.items():
        med = statistics.median(values)
        print(f"  {name:<22} median {med:7.3f} s   (min {min(values):.3f}, {args.repeats} runs)")
    print(json.dumps({"seconds": round(statistics.median(phases["total"]), 4)}))


if __name__ == "__main__":
    main()
