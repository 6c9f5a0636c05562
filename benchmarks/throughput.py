"""Training throughput on 2 processes: bigmac with the balancer against what users run today.

    python benchmarks/throughput.py [--encoder-layers 4,11] [--repeats 6] [--out PNG]

Three setups train the same example-sized tiny MLLM (``EXAMPLE_MODEL``'s LLM: 8 blocks of width
256; the encoder's depth sets its share of the work: 4 and 11 blocks give about 20% and 40%) on the same
samples for the same number of SGD steps, on ``pp=2`` gloo processes of one thread each:

* (a) ``bigmac``: our runtime and nested schedule; the balancer packs each step's samples into
  microbatches and picks their encoder owners, with costs fitted to a profiled step;
* (b) ``megatron``: our runtime with the Megatron layout (encoder inside stage 0, generator
  inside the last stage, 1F1B), the samples packed the naive way: in arrival order, a new
  microbatch whenever the next sample would cross the token cap (what Megatron users do);
* (c) ``torch_pipelining``: ``torch.distributed.pipelining``'s ``PipelineStage`` and
  ``Schedule1F1B``, stage 0 = encoder + embedding + first half of the blocks (torchtitan's and
  Megatron's layout), on (b)'s microbatches padded to the step's most images and longest text,
  since its stages need fixed shapes (see ``benchmarks/baselines/torch_pipelining.py``).

Samples: 0-2 images of 48 patches each, 16-64 text tokens, token cap 256 per microbatch, M=8 microbatches per
step; each step's samples are the ones naive packing fits into M microbatches. A measurement
runs the ``--steps`` distinct steps once; every setup first runs them once to warm up (and to
build its stages for each padded shape), then the setups take turns, ``--repeats`` times, in a
rotating order, so load from other jobs on the machine falls on all of them. Samples/s = samples
of the pass / its wall time (rank 0, barriers around it; process start-up and planning are
outside). Ratios are medians over the repeats of the paired (same-round) ratios.

The encoder's share of the work is measured, not assumed: a profiled ``bigmac`` step over all
steps' microbatches (before the timed runs) gives each op's compute time; the share is encoder
forward + backward over all op time. The same profile fits the balancer's cost coefficients
(:func:`balancer.fit_coefficients`) and feeds the schedule simulator, which predicts each setup's
samples/s from schedule, packing and padding alone (the ``simulated`` column and the chart's
black marks): a measured ratio far from the simulated one is the runtime or the machine, not the
schedule. The last line is
``{"bigmac_vs_megatron": a/b, "bigmac_vs_torch_pipelining": a/c}`` (samples/s ratios) at the
largest encoder share, and a bar chart is saved to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from balancer import (
    BalancerConfig,
    Coefficients,
    CostModel,
    Geometry,
    Sample,
    StepPlan,
    fit_coefficients,
    pack,
)
from balancer.metrics import schedule_costs
from lightning_bigmac.runtime import OpEvent, PipelineExecutor, PipelineGroups, Routes, cost_profile
from lightning_bigmac.schedule import CostModel as ScheduleCosts
from lightning_bigmac.schedule import Op, Plan, build_plan, simulate
from lightning_bigmac.schedule.pictures import figure, save
from lightning_bigmac.testing.spawn import run
from lightning_bigmac.testing.tiny_mllm import TinyConfig, TinyMLLM, make_microbatches

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, also when imported
from balancer_quality import naive_steps
from baselines.torch_pipelining import TorchPipelineSetup
from runtime_overhead import EXAMPLE_MODEL

SETUPS = ("bigmac", "megatron", "torch_pipelining")
PP = 2
GEOMETRY = Geometry(patch_size=1, merge=1, temporal_patch=1, latent_patch=1)
"""An image of ``patches`` patches is described as ``(1, patches)`` pixels: every patch is one
encoder patch, one LLM position and one generator target, as in the tiny model."""

Microbatch = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class Workload:
    """Model size, data and measurement of one encoder share."""

    encoder_layers: int
    patches: int = 48
    model: dict[str, int] = field(default_factory=lambda: dict(EXAMPLE_MODEL))
    """:class:`TinyConfig` fields besides encoder depth, patches and ``max_len``."""
    images: tuple[int, int] = (0, 2)
    text: tuple[int, int] = (16, 64)
    token_cap: int = 256
    microbatches: int = 8
    steps: int = 2
    """Distinct data steps; one measurement runs each once."""
    repeats: int = 6
    seed: int = 0
    lr: float = 1e-4

    def config(self) -> TinyConfig:
        # padding in (c) can put a step's most images and longest text into one sequence
        fields = {**self.model, "encoder_layers": self.encoder_layers, "patches": self.patches}
        return replace(TinyConfig(), **{**fields, "max_len": 2 * self.token_cap})


# ---- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    """The samples and the naive packing every setup starts from (identical on every process)."""

    samples: list[Microbatch]
    """One sample per entry, shaped like a microbatch of :mod:`~lightning_bigmac.testing.tiny_mllm`."""
    descriptors: list[Sample]
    naive: list[list[list[int]]]
    """Per step, per microbatch: sample indices (arrival order, token cap)."""

    @classmethod
    def build(cls, w: Workload) -> Data:
        cfg = w.config()
        count = w.steps * w.microbatches * w.token_cap // (w.text[0] + w.patches) + w.microbatches
        samples = make_microbatches(cfg, count, seed=w.seed, images=w.images, text=w.text)
        descriptors = [describe(s, f"s{i}") for i, s in enumerate(samples)]
        tokens = [balancer_costs().spans(d).llm_tokens for d in descriptors]
        naive = naive_steps(tokens, w.microbatches, w.token_cap)[: w.steps]
        if len(naive) < w.steps:
            raise ValueError(f"{count} samples fill only {len(naive)} of {w.steps} steps")
        return cls(samples, descriptors, naive)

    def microbatches(self, step: Sequence[Sequence[int]]) -> list[Microbatch]:
        return [collate([self.samples[i] for i in mb]) for mb in step]

    def sample_count(self, k: int) -> int:
        return sum(len(mb) for mb in self.naive[k])


def describe(sample: Microbatch, key: str) -> Sample:
    """The balancer's descriptor of a tiny-model sample (each image is also a generator output)."""
    n, patches, _ = sample["images"].shape
    return Sample(
        key=key,
        text_tokens=sample["tokens"].shape[0],
        images=((1, patches),) * n,
        outputs=((1, patches),) * n,
    )


def balancer_costs(coefficients: Coefficients | None = None) -> CostModel:
    """The balancer's cost model of the tiny model, which attends over the whole pack."""
    return CostModel(geometry=GEOMETRY, coefficients=coefficients or Coefficients(), llm_attention="pack")


def collate(samples: Sequence[Microbatch]) -> Microbatch:
    """Samples -> one packed sequence: all images, then all text, as the tiny model expects."""
    return {key: torch.cat([s[key] for s in samples]) for key in ("images", "tokens", "labels", "gen_target")}


# ---- calibration: a profiled step gives the encoder share and the balancer's costs -------------------
@dataclass(frozen=True)
class Calibration:
    shares: dict[str, float]
    """Share of all op compute time: ``encoder``, ``llm``, ``generator``."""
    coefficients: Coefficients
    latency: float
    """Transfer latency measured in the profile (seconds)."""
    balanced: list[StepPlan]
    """The balancer's packing of each step's samples (sample indices per microbatch) and owners."""


def op_shares(events: Sequence[OpEvent]) -> dict[str, float]:
    """Compute time per module over all ranks, as shares of the total."""
    module = {"EF": "encoder", "EB": "encoder", "F": "llm", "B": "llm", "G": "generator"}
    out = dict.fromkeys(("encoder", "llm", "generator"), 0.0)
    for e in events:
        out[module[Op.parse(e.op).kind]] += e.end - e.start
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def balance(data: Data, coefficients: Coefficients, w: Workload) -> list[StepPlan]:
    """The balancer's packing of each naive step's samples; every sample must find a place."""
    model = balancer_costs(coefficients)
    config = BalancerConfig(
        pipeline_size=PP, microbatches=w.microbatches, token_cap=w.token_cap, cost_model=model
    )
    out = []
    for k, step in enumerate(data.naive):
        chosen = [i for mb in step for i in mb]
        result = pack([model.cost(data.descriptors[i]) for i in chosen], config)
        if result.unplaced:
            raise RuntimeError(f"the balancer left {len(result.unplaced)} samples of step {k} unplaced")
        plan = result.replicas[0]
        out.append(StepPlan(tuple(tuple(chosen[i] for i in mb) for mb in plan.microbatches), plan.owners))
    return out


def calibrate(groups: PipelineGroups, data: Data, w: Workload) -> Calibration:
    """Profile one bigmac step over every step's naive microbatches; fit, pack on rank 0, broadcast."""
    ex = PipelineExecutor(TinyMLLM(w.config(), seed=w.seed).parts(), groups, profile=True)
    mbs = [mb for step in data.naive for mb in data.microbatches(step)]
    ex.step(build_plan("bigmac", pp=PP, microbatches=w.microbatches), mbs[: w.microbatches])  # warm-up
    plan = build_plan("bigmac", pp=PP, microbatches=len(mbs))
    ex.step(plan, mbs)
    assert ex.profiler is not None
    events = ex.profiler.gather(groups.pipeline_group, dst=groups.pipeline_ranks[0])
    box: list[Any] = [None]
    if events is not None:
        described = [[data.descriptors[i] for i in mb] for step in data.naive for mb in step]
        profile = cost_profile(plan, events)
        coefficients = fit_coefficients(profile, described, geometry=GEOMETRY)
        packed = balance(data, coefficients, w)
        box[0] = Calibration(op_shares(events), coefficients, profile["latency"], packed)
    dist.broadcast_object_list(box, src=groups.pipeline_ranks[0], group=groups.pipeline_group)
    return box[0]


# ---- the setups ---------------------------------------------------------------------------------------
class Setup(Protocol):
    def step(self, k: int) -> float:
        """One optimizer step on data step ``k``; returns its loss."""
        ...


class RuntimeSetup:
    """Our runtime running fixed plans; SGD over the parameters this rank holds."""

    def __init__(
        self, groups: PipelineGroups, w: Workload, steps: Sequence[list[Microbatch]], plans: list[Plan]
    ):
        self.executor = PipelineExecutor(TinyMLLM(w.config(), seed=w.seed).parts(), groups)
        self.optimizer = torch.optim.SGD(self.executor.parameters(), lr=w.lr)
        self.steps, self.plans = steps, plans

    def step(self, k: int) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        result = self.executor.step(self.plans[k], self.steps[k])
        self.optimizer.step()
        return result.loss


def step_costs(data: Data, cal: Calibration, microbatches: Sequence[Sequence[int]]) -> ScheduleCosts:
    """The planner's per-microbatch costs of one packing (fitted coefficients, profiled latency)."""
    described = [[data.descriptors[i] for i in mb] for mb in microbatches]
    costs = schedule_costs(described, balancer_costs(cal.coefficients), pp=PP, vpp=1)
    return replace(costs, latency=cal.latency)


def padded_costs(data: Data, cal: Calibration, step: Sequence[Sequence[int]]) -> ScheduleCosts:
    """(c)'s costs: every microbatch padded to the step's most images and longest text.

    The padding is a text-only filler sample plus images without generator outputs: encoder and
    LLM pay for it, the generator (which reads the real positions only) does not.
    """
    images = [sum(len(data.descriptors[i].images) for i in mb) for mb in step]
    text = [sum(data.descriptors[i].text_tokens for i in mb) for mb in step]
    patches = data.samples[0]["images"].shape[1]
    pads = [
        Sample(
            key=f"pad{j}", text_tokens=max(text) - text[j], images=((1, patches),) * (max(images) - images[j])
        )
        for j in range(len(step))
    ]
    described = [[data.descriptors[i] for i in mb] + [pads[j]] for j, mb in enumerate(step)]
    return replace(
        schedule_costs(described, balancer_costs(cal.coefficients), pp=PP, vpp=1), latency=cal.latency
    )


def plans(data: Data, cal: Calibration, w: Workload) -> dict[str, list[Plan]]:
    """Each setup's plan per step; (c)'s is the 1F1B of ``megatron`` (what ``Schedule1F1B`` runs)."""
    bigmac = [
        build_plan(
            "bigmac",
            pp=PP,
            microbatches=w.microbatches,
            owners=list(plan.owners),
            costs=step_costs(data, cal, plan.microbatches),
        )
        for plan in cal.balanced
    ]
    megatron = [build_plan("megatron", pp=PP, microbatches=w.microbatches)] * w.steps
    return {"bigmac": bigmac, "megatron": megatron, "torch_pipelining": megatron}


def predicted(data: Data, cal: Calibration, w: Workload) -> dict[str, float]:
    """Samples/s the simulator predicts for each setup from the calibration profile's costs.

    Pipeline schedule, packing and padding are in it; Python, transfers beyond the profiled
    latency and the load of other jobs are not: a measured ratio far from this one is the runtime's.
    """
    every = plans(data, cal, w)
    costs = {
        "bigmac": [step_costs(data, cal, plan.microbatches) for plan in cal.balanced],
        "megatron": [step_costs(data, cal, step) for step in data.naive],
        "torch_pipelining": [padded_costs(data, cal, step) for step in data.naive],
    }
    samples = sum(data.sample_count(k) for k in range(w.steps))
    return {
        name: samples
        / sum(simulate(p, c, check=False).step_time for p, c in zip(every[name], costs[name], strict=True))
        for name in SETUPS
    }


def messages(data: Data, cal: Calibration, w: Workload) -> dict[str, float]:
    """Cross-rank messages per step (mean over steps): each waits for a time slice on a busy machine."""
    every = plans(data, cal, w)

    def count(plan: Plan) -> int:
        routes = Routes(plan)
        return sum(len(routes.from_peer(a, b)) for a in range(PP) for b in range(PP) if a != b)

    return {name: statistics.fmean(count(p) for p in every[name]) for name in SETUPS}


def make_setups(groups: PipelineGroups, data: Data, cal: Calibration, w: Workload) -> dict[str, Setup]:
    """(a), (b) and (c), each with its own copy of the same initial weights (collective)."""
    naive = [data.microbatches(step) for step in data.naive]
    balanced = [data.microbatches(plan.microbatches) for plan in cal.balanced]
    every = plans(data, cal, w)
    return {
        "bigmac": RuntimeSetup(groups, w, balanced, every["bigmac"]),
        "megatron": RuntimeSetup(groups, w, naive, every["megatron"]),
        "torch_pipelining": TorchPipelineSetup(TinyMLLM(w.config(), seed=w.seed), naive, lr=w.lr),
    }


# ---- measurement (on every rank) ----------------------------------------------------------------------
def timed_pass(setup: Setup, steps: int) -> float:
    """Wall time of one pass over the steps, between barriers (the slowest rank decides)."""
    dist.barrier()
    start = time.perf_counter()
    for k in range(steps):
        setup.step(k)
    dist.barrier()
    return time.perf_counter() - start


def worker(rank: int, w: Workload) -> dict[str, Any] | None:
    """Calibrate, build the setups, warm each up with one pass, then time them in turns."""
    groups = PipelineGroups.create(PP, 1)
    data = Data.build(w)
    cal = calibrate(groups, data, w)
    setups = make_setups(groups, data, cal, w)
    first_loss = {}
    for name, setup in setups.items():
        first_loss[name] = setup.step(0)  # the initial weights: comparable with a reference
        for k in range(1, w.steps):
            setup.step(k)
    walls: dict[str, list[float]] = {name: [] for name in setups}
    for r in range(w.repeats):
        for name in SETUPS[r % len(SETUPS) :] + SETUPS[: r % len(SETUPS)]:
            walls[name].append(timed_pass(setups[name], w.steps))
    if rank != 0:
        return None
    samples = sum(data.sample_count(k) for k in range(w.steps))
    processed = {
        "bigmac": sum(len(mb) for plan in cal.balanced for mb in plan.microbatches),
        "megatron": samples,
        "torch_pipelining": samples,
    }
    return {
        "shares": cal.shares,
        "walls": walls,
        "samples": processed,
        "first_loss": first_loss,
        "naive": data.naive,
        "balanced": [plan.microbatches for plan in cal.balanced],
        "calibration": cal,
    }


def measure(w: Workload, timeout: float = 300.0) -> dict[str, Any]:
    """Run :func:`worker` on 2 fresh processes; rank 0's result plus samples/s and paired ratios."""
    result = run(worker, PP, w, timeout=timeout, join_timeout=2 * timeout)[0]
    walls = result["walls"]
    result["samples_per_s"] = {name: [result["samples"][name] / t for t in walls[name]] for name in SETUPS}
    rates = result["samples_per_s"]
    data = Data.build(w)
    result["predicted"] = predicted(data, result["calibration"], w)
    result["messages"] = messages(data, result["calibration"], w)
    result["median"] = {name: statistics.median(rates[name]) for name in SETUPS}
    result["ratio"] = {
        name: statistics.median(a / b for a, b in zip(rates["bigmac"], rates[name], strict=True))
        for name in SETUPS[1:]
    }
    return result


# ---- report -------------------------------------------------------------------------------------------
def report(w: Workload, res: dict[str, Any]) -> str:
    """One encoder share's table: samples/s per setup and each setup's throughput over bigmac's.

    ``measured``: median over the rounds of the paired ratio; ``simulated``: the simulator's
    prediction from the calibration profile (schedule, packing and padding only); ``best``: the
    fastest pass over bigmac's fastest, i.e. the passes least disturbed by other load.
    """
    shares, rates = res["shares"], res["samples_per_s"]
    lines = [
        f"encoder share {shares['encoder']:.1%} ({w.encoder_layers} encoder layers; generator "
        f"{shares['generator']:.1%}, LLM {shares['llm']:.1%} of op compute time)",
        f"  {'setup':18s}{'samples/s median (min-max)':>30s}{'/ bigmac: measured':>20s}{'best':>7s}"
        f"{'simulated':>11s}{'messages/step':>15s}",
    ]
    sim = res["predicted"]
    for label, name in zip(("(a)", "(b)", "(c)"), SETUPS, strict=True):
        ratio = 1.0 if name == "bigmac" else 1 / res["ratio"][name]
        cell = f"{res['median'][name]:.2f} ({min(rates[name]):.2f}-{max(rates[name]):.2f})"
        lines.append(
            f"  {label} {name:14s}{cell:>30s}{ratio:20.3f}{max(rates[name]) / max(rates['bigmac']):7.3f}"
            f"{sim[name] / sim['bigmac']:11.3f}{res['messages'][name]:15.0f}"
        )
    return "\n".join(lines)


def plot(results: Sequence[tuple[Workload, dict[str, Any]]], path: Path) -> None:
    """Grouped bars: samples/s per setup at each encoder share, range over repeats as error bars."""
    fig = figure(figsize=(7, 4))
    ax = fig.subplots()
    width = 0.8 / len(SETUPS)
    for i, name in enumerate(SETUPS):
        xs = [g + (i - 1) * width for g in range(len(results))]
        med = [res["median"][name] for _, res in results]
        lo = [m - min(res["samples_per_s"][name]) for m, (_, res) in zip(med, results, strict=True)]
        hi = [max(res["samples_per_s"][name]) - m for m, (_, res) in zip(med, results, strict=True)]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=name)
        sim = [res["predicted"][name] for _, res in results]
        ax.plot(xs, sim, "k_", markersize=14, label="simulated" if i == 0 else None)
        if name != "bigmac":
            tops = [max(*res["samples_per_s"][name], res["predicted"][name]) for _, res in results]
            for x, m, (_, res) in zip(xs, tops, results, strict=True):
                ax.annotate(
                    f"a/{'bc'[i - 1]} = {res['ratio'][name]:.2f}",
                    (x, m),
                    ha="center",
                    va="bottom",
                    xytext=(0, 8),
                    textcoords="offset points",
                    fontsize=8,
                )
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([f"encoder {res['shares']['encoder']:.0%} of compute" for _, res in results])
    ax.set_ylabel("samples / s (median of repeats)")
    ax.set_title("Training throughput, pp=2 gloo processes, 1 thread each")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder-layers", default="4,11", help="encoder depths, one per encoder share")
    parser.add_argument("--patches", type=int, default=Workload.patches)
    parser.add_argument("--microbatches", type=int, default=Workload.microbatches)
    parser.add_argument("--steps", type=int, default=Workload.steps, help="distinct data steps per pass")
    parser.add_argument("--repeats", type=int, default=Workload.repeats)
    parser.add_argument("--seed", type=int, default=Workload.seed)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/throughput.png"))
    args = parser.parse_args()
    start, load = time.perf_counter(), os.getloadavg()[0]
    results = []
    for layers in (int(x) for x in args.encoder_layers.split(",")):
        w = Workload(
            encoder_layers=layers,
            patches=args.patches,
            microbatches=args.microbatches,
            steps=args.steps,
            repeats=args.repeats,
            seed=args.seed,
        )
        results.append((w, measure(w)))
        print(f"encoder layers {layers}: done after {time.perf_counter() - start:.0f} s", flush=True)
    w0, res0 = results[0]
    print(
        f"\nthroughput, pp=2 gloo processes x 1 thread; {w0.microbatches} microbatches per step, token cap "
        f"{w0.token_cap}, {w0.steps} steps ({res0['samples']['bigmac']} samples) per pass, "
        f"{w0.repeats} interleaved passes per setup; samples/s median (min-max)\n"
    )
    print("\n\n".join(report(w, res) for w, res in results))
    plot(results, args.out)
    w, last = max(results, key=lambda r: r[1]["shares"]["encoder"])
    print(
        f"\nat encoder share {last['shares']['encoder']:.1%}: "
        f"bigmac / megatron = {last['ratio']['megatron']:.3f}, "
        f"bigmac / torch_pipelining = {last['ratio']['torch_pipelining']:.3f} (medians of paired ratios); "
        f"chart: {args.out}\ntotal {time.perf_counter() - start:.0f} s; 1-minute load average "
        f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores"
    )
    print(
        json.dumps(
            {
                "bigmac_vs_megatron": round(last["ratio"]["megatron"], 4),
                "bigmac_vs_torch_pipelining": round(last["ratio"]["torch_pipelining"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
