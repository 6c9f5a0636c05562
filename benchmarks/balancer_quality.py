"""Balancer quality on a realistic multimodal mix: naive packing, a greedy baseline and ours, side by side.

    python benchmarks/balancer_quality.py [--pp 4] [--vpp 2] [--microbatches 32] [--token-cap 8192]
                                          [--llm-attention pack|sample] [--no-sweep]

The mix (seeded): 50% single images (224-1344 px a side), 20% multi-image (2-6 images,
224-768 px), 15% videos (4-32 frames, 224-448 px), 15% text only. Costs use the balancer's
default coefficients: FLOP ratios of the paper's main setting, Qwen3-30B-A3B with a 1.3B ViT
(derivation in ``balancer/cost.py``). The mix generates no images, so the generator does no work.
Each step's samples are the ones *naive sequential packing* (samples in arrival order, a new
microbatch whenever the next sample would cross the token cap, owners ``j mod P``, nothing
reordered) puts into M microbatches; the other methods pack that same set:

* greedy: LPT on token counts (what a sequence-length balancer does), owners ``j mod P``;
* ours: :func:`balancer.pack` (LPT, column exchange, light-ends order, owners);
* even (a reference, not a packing): every microbatch costs the step's mean, owners ``j mod P``.

Metrics are means over steps: encoder column imbalance (mean over groups of heaviest/mean
owner cost), LLM microbatch imbalance (max/mean), padding waste (if padded to the step's
longest microbatch), and the simulated ``bigmac`` step time against its bubble-free lower
bound and against naive. The lower bound (busiest rank's LLM work plus an even share of the
encoder work) is the same for every packing of a step, so ``lower bound / naive`` is a floor no
packer can go under; a sweep over P and M shows that floor where M is 4P to 16P. Throughput is
the map-style sampler's, end to end (descriptors to steps), median of repeats. The last line
is JSON for our balancer in the main setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from balancer import BalancedBatchSampler, BalancerConfig, Sample, SampleCostModel, StepPlan, pack
from balancer.metrics import step_quality
from balancer.partition import lpt
from lightning_bigmac.schedule import OpCosts, build_plan, simulate


def realistic_mix(n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)

    def image(lo: int, hi: int) -> tuple[int, int]:
        h = int(rng.integers(lo, hi + 1))
        w = int(np.clip(h * np.exp(rng.uniform(-0.5, 0.5)), lo, hi))  # aspect ratios ~0.6-1.6
        return h, w

    def text(median: float, sigma: float, hi: int) -> int:
        return int(np.clip(rng.lognormal(np.log(median), sigma), 16, hi))

    out = []
    for i, kind in enumerate(rng.choice(4, size=n, p=[0.5, 0.2, 0.15, 0.15])):
        key = f"mix{seed}-{i:07d}"
        if kind == 0:
            out.append(Sample(key=key, text_tokens=text(150, 0.8, 2048), images=(image(224, 1344),)))
        elif kind == 1:
            count = int(rng.integers(2, 7))
            images = tuple(image(224, 768) for _ in range(count))
            out.append(Sample(key=key, text_tokens=text(250, 0.7, 2048), images=images))
        elif kind == 2:
            frames, (h, w) = int(rng.integers(4, 33)), image(224, 448)
            out.append(Sample(key=key, text_tokens=text(150, 0.7, 1024), videos=((frames, h, w),)))
        else:
            out.append(Sample(key=key, text_tokens=text(550, 0.9, 6000)))
    return out


def naive_steps(tokens: list[int], microbatches: int, cap: int) -> list[list[list[int]]]:
    """Sequential packing: arrival order, next microbatch when the cap would be crossed."""
    steps, step, current, used = [], [], [], 0
    for i, t in enumerate(tokens):
        if used + t > cap:
            step.append(current)
            current, used = [], 0
            if len(step) == microbatches:
                steps.append(step)
                step = []
        current.append(i)
        used += t
    return steps


Method = Callable[[list[list[int]]], tuple[StepPlan, int]]
"""One step's naive microbatches (sample indices) -> the method's plan and how many it left out."""


def methods(samples: list[Sample], config: BalancerConfig) -> dict[str, Method]:
    p, m, cap = config.pipeline_size, config.microbatches, config.token_cap
    costs = [config.cost_model.cost(s) for s in samples]
    default_owners = tuple(j % p for j in range(m))

    def naive(step: list[list[int]]) -> tuple[StepPlan, int]:
        return StepPlan(tuple(tuple(mb) for mb in step), default_owners), 0

    def greedy(step: list[list[int]]) -> tuple[StepPlan, int]:
        chosen = [i for mb in step for i in mb]
        tokens = [costs[i].tokens for i in chosen]
        part = lpt(tokens, m, sizes=tokens, capacity=cap)
        plan = StepPlan(tuple(tuple(chosen[k] for k in mb) for mb in part.parts), default_owners)
        return plan, len(part.unplaced)

    def ours(step: list[list[int]]) -> tuple[StepPlan, int]:
        chosen = [i for mb in step for i in mb]
        result = pack([costs[i] for i in chosen], config)
        mine = result.replicas[0]
        plan = StepPlan(tuple(tuple(chosen[k] for k in mb) for mb in mine.microbatches), mine.owners)
        return plan, len(result.unplaced)

    return {"naive": naive, "greedy": greedy, "ours": ours}


def even_step_time(microbatches: list[list[Sample]], model: SampleCostModel, *, pp: int, vpp: int) -> float:
    """Simulated step if every microbatch cost the step's mean of every op (owners ``j mod P``)."""
    ops = [model.op_costs(mb) for mb in microbatches]
    mean = {name: statistics.fmean(o[name] for o in ops) for name in ops[0]}
    costs = OpCosts(
        encoder_forward=mean["encoder_forward"],
        encoder_backward=mean["encoder_backward"],
        llm_forward=mean["llm_forward"] / (pp * vpp),
        llm_backward=mean["llm_backward"] / (pp * vpp),
        generator=mean["generator"],
    )
    plan = build_plan(
        "bigmac",
        pp=pp,
        vpp=vpp,
        microbatches=len(microbatches),
        costs=costs,
        encoder=mean["encoder_forward"] > 0,
        generator=mean["generator"] > 0,
    )
    return simulate(plan, costs, check=False).step_time


def packing_floor(samples: list[Sample], m: int, model: SampleCostModel, *, pp: int) -> float:
    """The simulator's lower bound for the best conceivable packing of ``samples`` into ``m`` microbatches.

    The bound is ``(LLM work + encoder and generator work) / P``. Encoder and generator work is the
    same however samples are packed; LLM work is additive per sample under a document mask and,
    under attention over the pack, convex in the pack's length, hence least when every microbatch
    holds the mean token count (Jensen). Exact for coefficients without per-op overheads (the defaults).
    """
    c = model.coefficients
    ops = model.op_costs(samples)  # encoder and generator work of all the samples
    tokens = [model.spans(s).llm_tokens for s in samples]
    spans = [sum(tokens) / m] * m if model.llm_attention == "pack" else tokens
    llm = c.llm_forward.variable(spans) + c.llm_backward.variable(spans)
    return (llm + ops["encoder_forward"] + ops["encoder_backward"] + ops["generator"]) / pp


def evaluate(
    config: BalancerConfig, vpp: int, steps: int, seed: int, only: tuple[str, ...] = ()
) -> dict[str, dict[str, float]]:
    """Per method (and ``even``), quality metrics averaged over ``steps`` naive steps of the mix."""
    p, m = config.pipeline_size, config.microbatches
    samples = realistic_mix(steps * m * 8, seed)
    tokens = [config.cost_model.cost(s).tokens for s in samples]
    chosen_steps = naive_steps(tokens, m, config.token_cap)[:steps]
    rows: dict[str, dict[str, float]] = {}
    for name, method in methods(samples, config).items():
        if only and name not in only:
            continue
        quality: list[dict[str, float]] = []
        unplaced = 0
        for step in chosen_steps:
            plan, lost = method(step)
            unplaced += lost
            mbs = [[samples[i] for i in mb] for mb in plan.microbatches]
            quality.append(step_quality(mbs, plan.owners, config.cost_model, pp=p, vpp=vpp))
        rows[name] = {k: statistics.fmean(q[k] for q in quality) for k in quality[0]}
        rows[name]["step_vs_lb"] = statistics.fmean(q["step_time"] / q["lower_bound"] for q in quality)
        rows[name]["total_step_time"] = sum(q["step_time"] for q in quality)
        rows[name]["unplaced"] = unplaced
    even = [
        even_step_time([[samples[i] for i in mb] for mb in step], config.cost_model, pp=p, vpp=vpp)
        for step in chosen_steps
    ]
    floor = sum(
        packing_floor([samples[i] for mb in step for i in mb], m, config.cost_model, pp=p)
        for step in chosen_steps
    )
    naive_total = rows["naive"]["total_step_time"]
    rows["even"] = {"total_step_time": sum(even)}
    rows["floor"] = {"total_step_time": floor}
    for row in rows.values():
        row["step_vs_naive"] = row["total_step_time"] / naive_total
    return rows


def sweep(args: argparse.Namespace, model: SampleCostModel) -> None:
    """The floor and our ratio where P is 4 or 8 and M is 4P, 8P or 16P (the paper's figure: P=4, M=64)."""
    print(
        f"\nsweep (V={args.vpp}, token_cap={args.token_cap}, {args.sweep_steps} steps each): step / naive's"
    )
    print(f"{'P':>3s}{'M':>5s}{'naive/LB':>10s}{'ours/LB':>10s}{'even':>8s}{'ours':>8s}{'floor':>8s}")
    for p in (4, 8):
        for m in (4 * p, 8 * p, 16 * p):
            config = BalancerConfig(
                pipeline_size=p, microbatches=m, token_cap=args.token_cap, cost_model=model
            )
            rows = evaluate(config, args.vpp, args.sweep_steps, args.seed, only=("naive", "ours"))
            naive, ours = rows["naive"], rows["ours"]
            print(
                f"{p:3d}{m:5d}{naive['step_vs_lb']:10.3f}{ours['step_vs_lb']:10.3f}"
                f"{rows['even']['step_vs_naive']:8.3f}{ours['step_vs_naive']:8.3f}"
                f"{rows['floor']['step_vs_naive']:8.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--vpp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=32)
    parser.add_argument("--token-cap", type=int, default=8192)
    parser.add_argument("--llm-attention", choices=("pack", "sample"), default="pack")
    parser.add_argument("--steps", type=int, default=24, help="steps simulated")
    parser.add_argument("--sweep-steps", type=int, default=6, help="steps simulated per sweep point")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep over P and M")
    parser.add_argument("--throughput-samples", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    p, m, cap = args.pp, args.microbatches, args.token_cap
    model = SampleCostModel(llm_attention=args.llm_attention)
    config = BalancerConfig(pipeline_size=p, microbatches=m, token_cap=cap, cost_model=model)
    rows = evaluate(config, args.vpp, args.steps, args.seed)

    descriptors = realistic_mix(args.throughput_samples, args.seed + 1)
    rates = []
    for _ in range(args.repeats):
        sampler = BalancedBatchSampler(descriptors, config, seed=args.seed)
        t0 = time.perf_counter()
        packed = sum(len(mb) for step in sampler for mb in step.microbatches)
        rates.append(packed / (time.perf_counter() - t0))
    rate = statistics.median(rates)

    print(
        f"balancer quality, paper main setting (Qwen3-30B-A3B + 1.3B ViT, no generator work): "
        f"P={p} V={args.vpp} M={m} token_cap={cap}, LLM attention over the {args.llm_attention}; "
        f"{args.steps} steps\n"
    )
    names = ("naive", "greedy", "ours")
    table = [
        ("encoder column imbalance (mean max/mean)", "encoder_imbalance", "{:.3f}"),
        ("LLM microbatch imbalance (max/mean)", "llm_imbalance", "{:.3f}"),
        ("padding waste (pad to longest)", "padding_waste", "{:.1%}"),
        ("simulated bigmac step / lower bound", "step_vs_lb", "{:.3f}"),
        ("simulated bigmac step / naive's", "step_vs_naive", "{:.3f}"),
        ("samples left unplaced (deferred)", "unplaced", "{:.0f}"),
    ]
    print(f"{'':44s}" + "".join(f"{name:>10s}" for name in names))
    for label, key, fmt in table:
        print(f"{label:44s}" + "".join(f"{fmt.format(rows[name][key]):>10s}" for name in names))
    print(f"\nsampler throughput (ours, end to end): {rate:,.0f} samples/s (median of {args.repeats})")
    print(
        f"floor: no packing of these steps gets under {rows['floor']['step_vs_naive']:.3f} x naive's step "
        f"(the lower bound of the best conceivable packing); every microbatch at the step's mean cost "
        f"would give {rows['even']['step_vs_naive']:.3f}"
    )
    if not args.no_sweep:
        sweep(args, model)
    ours = rows["ours"]
    print(
        json.dumps(
            {
                "encoder_imbalance": round(ours["encoder_imbalance"], 4),
                "llm_imbalance": round(ours["llm_imbalance"], 4),
                "step_time_vs_naive": round(ours["step_vs_naive"], 4),
                "samples_per_s": round(rate),
            }
        )
    )


if __name__ == "__main__":
    main()
