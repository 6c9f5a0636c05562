"""The pipeline runtime's overhead and the profile -> simulate prediction error, on 2 processes.

    python benchmarks/runtime_overhead.py [--schedule bigmac] [--microbatches 32] [--steps 12]
                                          [--data balanced|random]

Runs real steps of an example-sized tiny MLLM (``EXAMPLE_MODEL``: 8 LLM blocks of width 256,
a 2-block encoder, images of 16 patches, sequences up to 160 positions) on ``pp=2`` gloo
processes, with M = 32 microbatches per step by default (``--microbatches``). The step's data is
what training feeds the runtime: random samples (0-2 images, 4-24 text tokens) packed by the
balancer into microbatches of even LLM length, with its encoder/generator owners
(``--data balanced``); ``--data random`` gives unpacked microbatches of 32-96 tokens and 0-3
images with round-robin owners instead, where the schedule's own stalls add several percent.
Per step it reports:

* overhead: step wall time (from the profiler's start barrier to ``executor.step``'s return on
  rank 0, gradient sync included) over the sum of op compute times on the busiest rank. This
  includes the schedule's own pipeline bubbles, so it is >= 1 even for a perfect runtime;
  ``wall / simulated`` separates the runtime's share (transfers, Python, sync) from the schedule's.
* schedule alone: the simulated step with zero transfer latency over the busiest rank's busy
  time, i.e. the overhead a runtime with free transfers would show for this plan and these op
  times;
* sim error: |simulated / measured - 1|, the simulator fed with that step's profile against
  the measured step (last op end since the start barrier).

Two plans of the same step alternate in one process pair, so both see the same machine load:
the plan the strategy builds with unit costs (``costs=None``), and the plan re-made from the
first step's profile, as ``BigMacStrategy(costs="profile")`` (the example's CPU config) does:
the measured transfer latency makes ``llm_warmup="auto"`` warm stage 0 up one forward further.
Medians over ``--steps`` steps of each after the first (warm-up); the last line, for the
profiled plan, is ``{"overhead": <ratio>, "sim_error": <abs relative error>}``. Two CPU cores run
both ranks, so other load on the machine shows up as latency: quote figures from a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics

from balancer import BalancerConfig, Coefficients, Geometry, Sample, SampleCostModel, Term, pack
from lightning_bigmac.runtime import cost_profile
from lightning_bigmac.schedule import OpCosts, Plan, simulate
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
SAMPLE_COSTS = SampleCostModel(
    # a 16x16-pixel image is the tiny model's 16 patches, 16 LLM positions and 16 generated patches
    geometry=Geometry(patch_size=4, merge=1, temporal_patch=1, latent_patch=4),
    # FLOPs relative to one LLM position forward (8 blocks): an encoder patch runs 2 blocks, a
    # generated patch a small MLP; backward twice the forward
    coefficients=Coefficients(
        encoder_forward=Term(linear=0.25),
        encoder_backward=Term(linear=0.5),
        llm_forward=Term(linear=1.0),
        llm_backward=Term(linear=2.0),
        generator=Term(linear=0.11),
    ),
)


def balanced_step(pp: int, microbatches: int, token_cap: int, seed: int = 0) -> tuple[list, list[int]]:
    """One step of random samples packed by the balancer: ``(images, text tokens)`` per microbatch
    (the tiny model's microbatch sizes) and the owner of each, in execution order."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    tokens = 0
    while tokens < 0.9 * microbatches * token_cap:  # the balancer's default fill
        images = ((16, 16),) * rng.choices((0, 1, 2), weights=(0.4, 0.45, 0.15))[0]
        sample = Sample(key=f"s{len(samples)}", text_tokens=rng.randint(4, 24), images=images, outputs=images)
        samples.append(sample)
        tokens += SAMPLE_COSTS.cost(sample).tokens
    config = BalancerConfig(
        pipeline_size=pp, microbatches=microbatches, token_cap=token_cap, cost_model=SAMPLE_COSTS
    )
    (step,) = pack([SAMPLE_COSTS.cost(s) for s in samples], config).replicas
    sizes = [
        (sum(len(samples[i].images) for i in mb), sum(samples[i].text_tokens for i in mb))
        for mb in step.microbatches
    ]
    return sizes, list(step.owners)


def step_row(record: dict) -> dict[str, float]:
    """One profiled step's figures (see the module docstring)."""
    plan, events = Plan.from_dict(record["plan"]), record["events"]
    busiest = max(sum(e.end - e.start for e in events if e.rank == r) for r in range(plan.pp))
    costs = OpCosts.from_profile(cost_profile(plan, events))
    simulated = simulate(plan, costs).step_time
    no_latency = simulate(plan, dataclasses.replace(costs, latency=0.0)).step_time
    return {
        "wall": record["wall"],
        "busiest": busiest,
        "overhead": record["wall"] / busiest,
        "wall_over_sim": record["wall"] / simulated,
        "schedule_only": no_latency / busiest,
        "latency_ms": costs.latency * 1e3,
        "sim_error": abs(simulated / max(e.end for e in events) - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", default="bigmac")
    parser.add_argument("--microbatches", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per plan")
    parser.add_argument("--data", choices=("balanced", "random"), default="balanced")
    args = parser.parse_args()

    case = {
        "schedule": args.schedule,
        "microbatches": args.microbatches,
        "data": "long",
        "measure": "profile",
        "model": EXAMPLE_MODEL,
        "steps": 1 + 2 * args.steps,
        "replan": True,
    }
    if args.data == "balanced":
        case["sizes"], owners = balanced_step(2, args.microbatches, EXAMPLE_MODEL["max_len"])
        if args.schedule in ("ideal", "bigmac", "bigmac_zb"):
            case["owners"] = owners
    (got,) = run(run_cases, 2, 2, 1, 1, [case], timeout=600.0)[0]
    medians = {}
    for tuned, name in ((False, "unit-cost plan"), (True, "profiled plan")):
        records = [rec for rec in got["records"][1:] if rec["tuned"] == tuned]
        rows = [step_row(rec) for rec in records]
        for r in rows:
            print(
                f"{name}: wall {r['wall'] * 1e3:7.1f} ms, busiest rank {r['busiest'] * 1e3:7.1f} ms, "
                f"overhead {r['overhead']:.3f} (schedule alone {r['schedule_only']:.3f}, latency "
                f"{r['latency_ms']:.2f} ms), wall/simulated {r['wall_over_sim']:.3f}, "
                f"sim error {r['sim_error']:.3f}"
            )
        med = medians[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(
            f"{args.schedule} pp=2 microbatches={args.microbatches} ({args.data} data, {name}, "
            f"llm_warmup {Plan.from_dict(records[0]['plan']).knobs.get('llm_warmup')}): median overhead "
            f"{med['overhead']:.3f}, wall/simulated {med['wall_over_sim']:.3f}, "
            f"sim error {med['sim_error']:.3f} over {len(rows)} steps"
        )
    head = medians["profiled plan"]  # what the example's CPU config runs (costs: profile)
    print(json.dumps({"overhead": round(head["overhead"], 4), "sim_error": round(head["sim_error"], 4)}))


if __name__ == "__main__":
    main()
