"""The pipeline runtime's overhead and the profile -> simulate prediction error, on 2 processes.

    python benchmarks/runtime_overhead.py [--schedule bigmac] [--microbatches 32] [--steps 5]

Runs real steps of an example-sized tiny MLLM (``EXAMPLE_MODEL``: 8 LLM blocks of width 256,
a 2-block encoder, images of 16 patches, 32-96 text tokens) on ``pp=2`` gloo processes, with
M = 32 microbatches per step by default (``--microbatches``): at M = 16 the schedule's own fill
and drain already cost 10% at P = 2, at M = 32 about 5%, which leaves the runtime's share
visible. Per step it reports:

* overhead: step wall time (``executor.step`` call to return on rank 0, gradient sync included)
  over the sum of op compute times on the busiest rank. This includes the schedule's own
  pipeline bubbles, so it is >= 1 even for a perfect runtime; ``wall / simulated`` separates
  the runtime's share (transfers, Python, sync) from the schedule's.
* schedule alone: the simulated step with zero transfer latency over the busiest rank's busy
  time, i.e. the overhead a runtime with free transfers would show for this plan and these op
  times;
* sim error: |simulated / measured - 1|, the simulator fed with that step's profile against
  the measured step (last op end since the start barrier).

Medians over the steps after the first (warm-up); the last line is
``{"overhead": <ratio>, "sim_error": <abs relative error>}``. Two CPU cores run both ranks, so
other load on the machine shows up as latency: quote figures from a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

from lightning_bigmac.runtime import cost_profile
from lightning_bigmac.schedule import CostModel, Plan, simulate
from lightning_bigmac.testing.scenarios import run_cases
from lightning_bigmac.testing.spawn import run

EXAMPLE_MODEL = {
    "dim": 256,
    "heads": 4,
    "layers": 8,
    "encoder_layers": 2,
    "patches": 16,
    "patch_dim": 48,
    "max_len": 160,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", default="bigmac")
    parser.add_argument("--microbatches", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    case = {
        "schedule": args.schedule,
        "microbatches": args.microbatches,
        "data": "long",
        "measure": "profile",
        "model": EXAMPLE_MODEL,
        "steps": args.steps,
    }
    got = run(run_cases, 2, 2, 1, 1, [case], timeout=120.0)[0][0]
    plan = Plan.from_dict(got["plan"])
    rows = []
    for rec in got["records"][1:]:
        events = rec["events"]
        busy = [sum(e.end - e.start for e in events if e.rank == r) for r in range(plan.pp)]
        measured = max(e.end for e in events)
        costs = CostModel.from_profile(cost_profile(plan, events))
        simulated = simulate(plan, costs).step_time
        no_latency = simulate(plan, dataclasses.replace(costs, latency=0.0)).step_time
        rows.append(
            {
                "wall": rec["wall"],
                "busiest": max(busy),
                "overhead": rec["wall"] / max(busy),
                "wall_over_sim": rec["wall"] / simulated,
                "schedule_only": no_latency / max(busy),
                "latency_ms": costs.latency * 1e3,
                "sim_error": abs(simulated / measured - 1),
            }
        )
        r = rows[-1]
        print(
            f"step: wall {r['wall'] * 1e3:7.1f} ms, busiest rank {r['busiest'] * 1e3:7.1f} ms, "
            f"overhead {r['overhead']:.3f} (schedule alone {r['schedule_only']:.3f}, latency "
            f"{r['latency_ms']:.2f} ms), wall/simulated {r['wall_over_sim']:.3f}, "
            f"sim error {r['sim_error']:.3f}"
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(
        f"{args.schedule} pp=2 microbatches={args.microbatches}: median overhead {med['overhead']:.3f} "
        f"(target <= 1.10), wall/simulated {med['wall_over_sim']:.3f}, sim error {med['sim_error']:.3f} "
        f"over {len(rows)} steps"
    )
    print(json.dumps({"overhead": round(med["overhead"], 4), "sim_error": round(med["sim_error"], 4)}))


if __name__ == "__main__":
    main()
