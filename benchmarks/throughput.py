"""Training throughput on 2 processes: bigmac with the balancer against the best-configured baselines.

    python benchmarks/throughput.py [--encoder-layers 11,24] [--microbatches 16] [--repeats 4] [--out PNG]

Six setups train the same example-sized tiny MLLM (``EXAMPLE_MODEL``'s LLM: 8 blocks of width
256; the encoder's depth sets its share of the work: 11 and 24 blocks give about 40% and 58%,
below and above the 1/P = 50% that stage 0 of a 2-stage pipeline can carry) on the same samples
for the same number of SGD steps, on ``pp=2`` gloo processes of one thread each:

* ``bigmac``: our runtime and nested schedule; the balancer packs the samples into microbatches
  and picks their encoder owners, with costs fitted to a profiled step;
* ``ideal``: the same microbatches and owners under the ``ideal`` schedule (every encoder forward
  first, the LLM's 1F1B, every encoder backward last: Megatron-Core MIMO's colocated schedule),
  the speed reference; each rank holds M/P microbatches of encoder activations, bigmac W;
* ``megatron_tuned``, ``megatron_even``: our runtime with the Megatron layout (encoder inside
  stage 0, generator inside the last stage, 1F1B) on the samples packed the naive way (arrival
  order, a new microbatch whenever the next sample would cross the token cap), the LLM blocks cut
  at the best split point (what ``--decoder-first-pipeline-num-layers`` sets) and, untuned, in half;
* ``torch_pipelining_tuned``, ``torch_pipelining_even``: ``torch.distributed.pipelining``'s
  ``PipelineStage`` and ``Schedule1F1B``, stage 0 = encoder + embedding + the first blocks
  (torchtitan's layout) on the naive microbatches; stage 0 runs the encoder on the real images
  and pads the sequence it sends to the step's most images and longest text, since the stages
  need fixed message shapes (see ``benchmarks/baselines/torch_pipelining.py``); split as above.

Split points are chosen cheaply: the schedule simulator times every candidate (stage 1 starting
at block 1 .. n-1) from the calibration profile's costs, with identical blocks (a stage's LLM op
takes its share of the blocks); the best one then runs on real processes next to the even one.

Samples: 0-2 images of 48 patches each, 16-64 text tokens, token cap 256 per microbatch, M=16
microbatches per step; a pass is the ``--steps`` steps (default 1) that naive packing fills in
arrival order. The balancer packs the whole pass at once (as it packs a window of steps); a
sample it finds no room for (every microbatch near the cap) is left out of every setup's pass,
so all setups always train on the same samples. Every setup first runs the pass once to warm up
(and to build its stages for each padded shape), then the setups take turns, ``--repeats``
times, in a rotating order, so load from other jobs on the machine falls on all of them.
Samples/s = samples of the pass / its wall time (barriers around it; process start-up and
planning are outside). Ratios are medians over the repeats of the paired (same-round) ratios.
The runtime setups' peak encoder activation bytes (busiest rank) are counted in the warm-up pass
by the executor's :class:`~lightning_bigmac.runtime.memory.ActivationMeter`; the timed passes run
without it.

The encoder's share of the work is measured, not assumed: a profiled ``bigmac`` step over all
steps' microbatches (before the timed runs) gives each op's compute time; the share is encoder
forward + backward over all op time. The same profile fits the balancer's cost coefficients
(:func:`balancer.fit_coefficients`) and feeds the schedule simulator, which predicts each setup's
samples/s from schedule, packing, split and padding alone (the ``simulated`` column and the
chart's black marks): a measured ratio far from the simulated one is the runtime or the machine,
not the schedule. The last line is ``{"bigmac_vs_megatron_tuned",
"bigmac_vs_torch_pipelining_tuned", "bigmac_vs_ideal", "ideal_vs_bigmac_encoder_memory",
"bigmac_vs_megatron_even", "bigmac_vs_torch_pipelining_even"}`` (samples/s ratios, and ideal's
peak encoder bytes over bigmac's) at the largest encoder share; a bar chart is saved to
``--out``. A failed measurement is tried once more; a second failure prints the failing setup,
the exception and its traceback and exits non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from balancer import (
    BalancerConfig,
    Coefficients,
    Geometry,
    Sample,
    SampleCostModel,
    StepPlan,
    fit_coefficients,
    pack,
)
from balancer.metrics import schedule_costs
from lightning_bigmac.runtime import OpEvent, PipelineExecutor, PipelineGroups, Routes, cost_profile
from lightning_bigmac.schedule import Op, OpCosts, Plan, build_plan, simulate
from lightning_bigmac.schedule.pictures import figure, save
from lightning_bigmac.schedule.plan import B, F
from lightning_bigmac.testing.spawn import run
from lightning_bigmac.testing.tiny_mllm import TinyConfig, TinyMLLM, make_microbatches

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, also when imported
from balancer_quality import naive_steps
from baselines.torch_pipelining import TorchPipelineSetup, even_split
from runtime_overhead import EXAMPLE_MODEL

SPLIT_LAYOUTS = ("megatron", "torch_pipelining")
"""The encoder-on-stage-0 layouts, each run at its best split point (``_tuned``) and at the even one."""
SETUPS = ("bigmac", "ideal", *(f"{layout}_{cut}" for layout in SPLIT_LAYOUTS for cut in ("tuned", "even")))
REPACKED = "megatron+balancer"
"""The Megatron layout on the balancer's microbatches, in simulation only: bigmac over it at its best
split is bigmac's edge from the schedule alone, on equal packing."""
NESTED = ("bigmac", "ideal")
"""Setups with the encoder data-parallel on every rank, on the balancer's microbatches."""
PP = 2
GEOMETRY = Geometry(patch_size=1, merge=1, temporal_patch=1, latent_patch=1)
"""An image of ``patches`` patches is described as ``(1, patches)`` pixels: every patch is one
encoder patch, one LLM position and one generator target, as in the tiny model."""

Microbatch = dict[str, torch.Tensor]
Steps = list[list[list[int]]]
"""Per step, per microbatch: sample indices."""


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
    microbatches: int = 16
    steps: int = 1
    """Distinct data steps; one measurement runs each once."""
    repeats: int = 4
    seed: int = 0
    lr: float = 1e-4

    def config(self) -> TinyConfig:
        # padding in torch pipelining can put a step's most images and longest text into one sequence
        fields = {**self.model, "encoder_layers": self.encoder_layers, "patches": self.patches}
        return replace(TinyConfig(), **{**fields, "max_len": 2 * self.token_cap})

    @property
    def blocks(self) -> int:
        """LLM blocks: what the split points cut."""
        return self.config().layers


# ---- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    """The samples and the naive packing every setup starts from (identical on every process)."""

    samples: list[Microbatch]
    """One sample per entry, shaped like a microbatch of :mod:`~lightning_bigmac.testing.tiny_mllm`."""
    descriptors: list[Sample]
    naive: Steps
    """Arrival order, a new microbatch whenever the token cap would be crossed."""

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

    def without(self, left_out: Collection[int]) -> Data:
        """The same data with ``left_out`` samples taken out of the naive microbatches."""
        naive = [[[i for i in mb if i not in left_out] for mb in step] for step in self.naive]
        if any(not mb for step in naive for mb in step):
            raise ValueError(f"leaving out samples {sorted(left_out)} empties a naive microbatch")
        return replace(self, naive=naive)

    def microbatches(self, step: Sequence[Sequence[int]]) -> list[Microbatch]:
        return [collate([self.samples[i] for i in mb]) for mb in step]

    def pass_samples(self) -> int:
        """Samples of one pass (every step once)."""
        return sum(len(mb) for step in self.naive for mb in step)


def describe(sample: Microbatch, key: str) -> Sample:
    """The balancer's descriptor of a tiny-model sample (each image is also a generator output)."""
    n, patches, _ = sample["images"].shape
    return Sample(
        key=key,
        text_tokens=sample["tokens"].shape[0],
        images=((1, patches),) * n,
        outputs=((1, patches),) * n,
    )


def balancer_costs(coefficients: Coefficients | None = None) -> SampleCostModel:
    """The balancer's cost model of the tiny model, which attends over the whole pack."""
    return SampleCostModel(
        geometry=GEOMETRY, coefficients=coefficients or Coefficients(), llm_attention="pack"
    )


def collate(samples: Sequence[Microbatch]) -> Microbatch:
    """Samples -> one packed sequence: all images, then all text, as the tiny model expects."""
    return {key: torch.cat([s[key] for s in samples]) for key in ("images", "tokens", "labels", "gen_target")}


# ---- calibration: a profiled step gives the encoder share, the balancer's costs, the splits -----------
@dataclass(frozen=True)
class Calibration:
    shares: dict[str, float]
    """Share of all op compute time: ``encoder``, ``llm``, ``generator``."""
    coefficients: Coefficients
    latency: float
    """Transfer latency measured in the profile (seconds)."""
    balanced: list[StepPlan]
    """The balancer's packing of the pass (sample indices per microbatch) and owners, per step."""
    left_out: tuple[int, ...]
    """Samples the balancer found no room for: every setup leaves them out of the pass."""
    sweep: dict[str, dict[int, float]] = field(default_factory=dict)
    """Per swept layout (:data:`SPLIT_LAYOUTS`, :data:`REPACKED`): simulated samples/s at each split
    point (the first block of stage 1)."""


def op_shares(events: Sequence[OpEvent]) -> dict[str, float]:
    """Compute time per module over all ranks, as shares of the total."""
    module = {"EF": "encoder", "EB": "encoder", "F": "llm", "B": "llm", "G": "generator"}
    out = dict.fromkeys(("encoder", "llm", "generator"), 0.0)
    for e in events:
        out[module[Op.parse(e.op).kind]] += e.end - e.start
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def balance(data: Data, coefficients: Coefficients, w: Workload) -> tuple[list[StepPlan], tuple[int, ...]]:
    """The balancer's packing of the whole pass into ``w.steps`` steps, and the samples it left out.

    Packing one naive step's samples into as many microbatches under the same cap can fail when
    naive packing filled them tightly (how tightly depends on the fitted costs, i.e. on timing);
    packing the pass at once gives the balancer the room a stream gives it between steps.
    """
    model = balancer_costs(coefficients)
    config = BalancerConfig(
        pipeline_size=PP, microbatches=w.microbatches, token_cap=w.token_cap, cost_model=model
    )
    chosen = [i for step in data.naive for mb in step for i in mb]
    result = pack([model.cost(data.descriptors[i]) for i in chosen], config, replicas=w.steps)
    plans = [
        StepPlan(tuple(tuple(chosen[i] for i in mb) for mb in plan.microbatches), plan.owners)
        for plan in result.replicas
    ]
    return plans, tuple(chosen[i] for i in result.unplaced)


def calibrate(groups: PipelineGroups, data: Data, w: Workload) -> Calibration:
    """Profile one bigmac step over all naive microbatches; fit, pack and sweep on rank 0, broadcast."""
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
        packed, left_out = balance(data, coefficients, w)
        cal = Calibration(op_shares(events), coefficients, profile["latency"], packed, left_out)
        box[0] = replace(cal, sweep=sweep(data.without(left_out), cal, w))
    dist.broadcast_object_list(box, src=groups.pipeline_ranks[0], group=groups.pipeline_group)
    return box[0]


# ---- costs, splits and plans: what the simulator predicts -----------------------------------------------
def step_costs(data: Data, cal: Calibration, microbatches: Sequence[Sequence[int]]) -> OpCosts:
    """The planner's per-microbatch costs of one packing (fitted coefficients, profiled latency)."""
    described = [[data.descriptors[i] for i in mb] for mb in microbatches]
    costs = schedule_costs(described, balancer_costs(cal.coefficients), pp=PP, vpp=1)
    return replace(costs, latency=cal.latency)


def padded_costs(data: Data, cal: Calibration, step: Sequence[Sequence[int]]) -> OpCosts:
    """Torch pipelining's costs: the LLM pays for every microbatch padded to the step's most images
    and longest text.

    The padding is a text-only filler sample: the LLM pays for it; the encoder (which runs on the
    real images) and the generator (which reads the real positions) do not.
    """
    images = [sum(len(data.descriptors[i].images) for i in mb) for mb in step]
    text = [sum(data.descriptors[i].text_tokens for i in mb) for mb in step]
    patches = data.samples[0]["images"].shape[1]
    pads = [
        Sample(key=f"pad{j}", text_tokens=(max(images) - images[j]) * patches + max(text) - text[j])
        for j in range(len(step))
    ]
    described = [[data.descriptors[i] for i in mb] + [pads[j]] for j, mb in enumerate(step)]
    return replace(
        schedule_costs(described, balancer_costs(cal.coefficients), pp=PP, vpp=1), latency=cal.latency
    )


def layout_costs(data: Data, cal: Calibration, layout: str) -> list[OpCosts]:
    """A swept layout's costs per step, the LLM cut evenly: naive packing (padded for torch
    pipelining), or the balancer's packing for :data:`REPACKED`."""
    if layout == REPACKED:
        return [step_costs(data, cal, plan.microbatches) for plan in cal.balanced]
    costs = padded_costs if layout == "torch_pipelining" else step_costs
    return [costs(data, cal, step) for step in data.naive]


def split_costs(costs: OpCosts, split: int, blocks: int) -> OpCosts:
    """``costs`` (the LLM cut evenly, one chunk per rank) with stage 1 starting at block ``split``.

    The blocks are identical, so each rank's LLM ops take its share of the blocks' work (the
    embedding and the head, a few percent, ride along); the simulator reads per-rank LLM
    durations from ``measured``.
    """
    shares = (split / blocks, 1 - split / blocks)
    measured = {}
    for kind, per_chunk in ((F, costs.llm_forward), (B, costs.llm_backward)):
        assert isinstance(per_chunk, Sequence), "per-microbatch LLM costs expected"
        for j, duration in enumerate(per_chunk):
            for rank, share in enumerate(shares):
                measured[f"{rank}:{Op(kind, j, 0)}"] = duration * PP * share
    return replace(costs, measured=measured)


def one_f_one_b(w: Workload) -> list[Plan]:
    """The encoder-on-stage-0 layouts' plan per step (``megatron`` at V=1: what ``Schedule1F1B`` runs)."""
    return [build_plan("megatron", pp=PP, microbatches=w.microbatches)] * w.steps


def simulated_rate(plans: Sequence[Plan], costs: Sequence[OpCosts], samples: int) -> float:
    """Samples/s of one pass as the simulator times it."""
    steps = zip(plans, costs, strict=True)
    return samples / sum(simulate(plan, c, check=False).step_time for plan, c in steps)


def sweep(data: Data, cal: Calibration, w: Workload) -> dict[str, dict[int, float]]:
    """Simulated samples/s of each split layout (and :data:`REPACKED`) at every split point (stage 1
    starting at block s)."""
    plans, samples = one_f_one_b(w), data.pass_samples()
    out = {}
    for layout in (*SPLIT_LAYOUTS, REPACKED):
        costs = layout_costs(data, cal, layout)
        out[layout] = {
            s: simulated_rate(plans, [split_costs(c, s, w.blocks) for c in costs], samples)
            for s in range(1, w.blocks)
        }
    return out


def split_point(name: str, cal: Calibration, w: Workload) -> int:
    """A split setup's first block of stage 1: the simulated best (the even one wins ties) or the even one."""
    layout, cut = name.rsplit("_", 1)
    even = even_split(w.blocks)
    if cut == "even":
        return even
    rates = cal.sweep[layout]
    return max(rates, key=lambda s: (rates[s], s == even))


def layout_of(name: str) -> str:
    """``"megatron_tuned"`` -> ``"megatron"``; the nested setups are their own layout."""
    return name if name in NESTED else name.rsplit("_", 1)[0]


def split_label(name: str, cal: Calibration, w: Workload) -> str:
    """Blocks per stage, e.g. ``"2+6"``."""
    split = even_split(w.blocks) if name in NESTED else split_point(name, cal, w)
    return f"{split}+{w.blocks - split}"


def setup_steps(name: str, data: Data, cal: Calibration) -> Steps:
    """The sample indices a setup trains on, per step and microbatch."""
    if name in NESTED:
        return [[list(mb) for mb in plan.microbatches] for plan in cal.balanced]
    return data.naive


def plans(data: Data, cal: Calibration, w: Workload) -> dict[str, list[Plan]]:
    """Each setup's plan per step; the nested ones on the balancer's owners and fitted costs."""
    nested = {
        schedule: [
            build_plan(
                schedule,
                pp=PP,
                microbatches=w.microbatches,
                owners=list(plan.owners),
                costs=step_costs(data, cal, plan.microbatches),
            )
            for plan in cal.balanced
        ]
        for schedule in NESTED
    }
    return {**nested, **dict.fromkeys(SETUPS[len(NESTED) :], one_f_one_b(w))}


def predicted(data: Data, cal: Calibration, w: Workload) -> dict[str, float]:
    """Samples/s the simulator predicts for each setup from the calibration profile's costs.

    Pipeline schedule, packing, split and padding are in it; Python, transfers beyond the profiled
    latency and the load of other jobs are not: a measured ratio far from this one is the runtime's.
    """
    every = plans(data, cal, w)
    out = {}
    for name in SETUPS:
        if name in NESTED:
            costs = [step_costs(data, cal, mb) for mb in setup_steps(name, data, cal)]
        else:
            split = split_point(name, cal, w)
            costs = [split_costs(c, split, w.blocks) for c in layout_costs(data, cal, layout_of(name))]
        out[name] = simulated_rate(every[name], costs, data.pass_samples())
    return out


def messages(data: Data, cal: Calibration, w: Workload) -> dict[str, float]:
    """Cross-rank messages per step (mean over steps): each waits for a time slice on a busy machine."""
    every = plans(data, cal, w)

    def count(plan: Plan) -> int:
        routes = Routes(plan)
        return sum(len(routes.from_peer(a, b)) for a in range(PP) for b in range(PP) if a != b)

    return {name: statistics.fmean(count(p) for p in every[name]) for name in SETUPS}


# ---- the setups ---------------------------------------------------------------------------------------
class Setup(Protocol):
    def step(self, k: int) -> float:
        """One optimizer step on data step ``k``; returns its loss."""
        ...


class RuntimeSetup:
    """Our runtime running fixed plans; SGD over the parameters this rank holds.

    The activation meter records this rank's peak encoder bytes until :meth:`stop_metering`: its
    hooks cost Python time for every saved tensor, so the timed passes run without it.
    """

    def __init__(
        self,
        groups: PipelineGroups,
        w: Workload,
        steps: Sequence[list[Microbatch]],
        plans: list[Plan],
        split_points: tuple[int, ...] | None = None,
    ):
        parts = TinyMLLM(w.config(), seed=w.seed).parts()
        self.executor = PipelineExecutor(parts, groups, split_points=split_points, measure_memory=True)
        self.optimizer = torch.optim.SGD(self.executor.parameters(), lr=w.lr)
        self.steps, self.plans = steps, plans
        self.encoder_peak = 0

    def step(self, k: int) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        result = self.executor.step(self.plans[k], self.steps[k])
        self.optimizer.step()
        self.encoder_peak = max(self.encoder_peak, result.activation_peak.get("encoder", 0))
        return result.loss

    def stop_metering(self) -> None:
        self.executor.memory = None


def make_setup(name: str, groups: PipelineGroups, data: Data, cal: Calibration, w: Workload) -> Setup:
    """One setup with its own copy of the same initial weights (collective)."""
    steps = [data.microbatches(step) for step in setup_steps(name, data, cal)]
    if name in NESTED:
        return RuntimeSetup(groups, w, steps, plans(data, cal, w)[name])
    split = split_point(name, cal, w)
    if layout_of(name) == "megatron":
        return RuntimeSetup(groups, w, steps, one_f_one_b(w), split_points=(split,))
    return TorchPipelineSetup(TinyMLLM(w.config(), seed=w.seed), steps, lr=w.lr, split=split)


# ---- measurement (on every rank) ----------------------------------------------------------------------
@contextmanager
def reporting(what: str) -> Iterator[None]:
    """Name the setup and phase in any error; the spawn report adds this rank's traceback."""
    try:
        yield
    except Exception as err:
        raise RuntimeError(f"{what} failed: {type(err).__name__}: {err}") from err


def timed_pass(setup: Setup, steps: int) -> float:
    """Wall time of one pass over the steps, between barriers (the slowest rank decides)."""
    dist.barrier()
    start = time.perf_counter()
    for k in range(steps):
        setup.step(k)
    dist.barrier()
    return time.perf_counter() - start


def encoder_peaks(setups: Mapping[str, Setup]) -> dict[str, int]:
    """The busiest rank's peak encoder activation bytes per runtime setup (collective); stops metering."""
    metered = {name: s for name, s in setups.items() if isinstance(s, RuntimeSetup)}
    peaks = torch.tensor([s.encoder_peak for s in metered.values()], dtype=torch.int64)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    for s in metered.values():
        s.stop_metering()
    return dict(zip(metered, peaks.tolist(), strict=True))


def rotation(r: int) -> tuple[str, ...]:
    """Round ``r``'s order of the setups: each starts a round in turn."""
    k = r % len(SETUPS)
    return SETUPS[k:] + SETUPS[:k]


def worker(rank: int, w: Workload) -> dict[str, Any] | None:
    """Calibrate, build the setups, warm each up with one pass, then time them in turns."""
    groups = PipelineGroups.create(PP, 1)
    with reporting("calibration"):
        cal = calibrate(groups, Data.build(w), w)
        data = Data.build(w).without(cal.left_out)
    setups: dict[str, Setup] = {}
    first_loss: dict[str, float] = {}
    for name in SETUPS:
        with reporting(f"setup {name} (build and warm-up pass)"):
            setups[name] = make_setup(name, groups, data, cal, w)
            first_loss[name] = setups[name].step(0)  # the initial weights: comparable with a reference
            for k in range(1, w.steps):
                setups[name].step(k)
    peaks = encoder_peaks(setups)
    walls: dict[str, list[float]] = {name: [] for name in SETUPS}
    for r in range(w.repeats):
        for name in rotation(r):
            with reporting(f"setup {name} (timed pass {r + 1} of {w.repeats})"):
                walls[name].append(timed_pass(setups[name], w.steps))
    if rank != 0:
        return None
    return {
        "shares": cal.shares,
        "walls": walls,
        "steps": {name: setup_steps(name, data, cal) for name in SETUPS},
        "first_loss": first_loss,
        "encoder_peak": peaks,
        "calibration": cal,
    }


def measure(w: Workload, timeout: float = 300.0) -> dict[str, Any]:
    """Run :func:`worker` on 2 fresh processes; rank 0's result plus samples/s and paired ratios."""
    result = run(worker, PP, w, timeout=timeout, join_timeout=2 * timeout)[0]
    cal: Calibration = result["calibration"]
    data = Data.build(w).without(cal.left_out)
    samples = data.pass_samples()
    rates = {name: [samples / t for t in result["walls"][name]] for name in SETUPS}
    peaks, simulated = result["encoder_peak"], predicted(data, cal, w)
    result.update(
        samples=samples,
        samples_per_s=rates,
        predicted=simulated,
        messages=messages(data, cal, w),
        splits={name: split_label(name, cal, w) for name in SETUPS},
        median={name: statistics.median(rates[name]) for name in SETUPS},
        ratio={
            name: statistics.median(a / b for a, b in zip(rates["bigmac"], rates[name], strict=True))
            for name in SETUPS[1:]
        },
        memory_ratio=peaks["ideal"] / peaks["bigmac"],
        schedule_edge=simulated["bigmac"] / max(cal.sweep[REPACKED].values()),
    )
    return result


def measure_or_exit(w: Workload) -> dict[str, Any]:
    """:func:`measure`, tried once more after a failure (on a shared machine a peer can take the
    port or starve a rank); the second failure ends the script with its reason."""
    for attempt in (1, 2):
        try:
            return measure(w)
        except Exception as err:
            print(f"\nencoder layers {w.encoder_layers}, attempt {attempt} of 2 failed:", file=sys.stderr)
            traceback.print_exc()
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    sys.exit(f"throughput.py failed at encoder layers {w.encoder_layers}: {reason}")


# ---- report -------------------------------------------------------------------------------------------
def report(w: Workload, res: dict[str, Any]) -> str:
    """One encoder share's table and its split sweep.

    ``bigmac / setup``: measured = median over the rounds of the paired ratio; best = bigmac's
    fastest pass over the setup's fastest (the passes least disturbed by other load); simulated =
    the simulator's prediction from the calibration profile (schedule, packing, split, padding).
    """
    shares, rates, sim = res["shares"], res["samples_per_s"], res["predicted"]
    cal: Calibration = res["calibration"]
    left_out = f"; {len(cal.left_out)} samples left out (no room)" if cal.left_out else ""
    lines = [
        f"encoder share {shares['encoder']:.1%} ({w.encoder_layers} encoder layers; generator "
        f"{shares['generator']:.1%}, LLM {shares['llm']:.1%} of op compute time){left_out}",
        f"  {'setup':24s}{'blocks':>7s}{'samples/s median (min-max)':>29s}{'bigmac / setup:':>17s}"
        f"{'measured':>9s}{'best':>7s}{'simulated':>10s}{'messages':>10s}{'encoder peak':>14s}",
    ]
    for name in SETUPS:
        ratio = 1.0 if name == "bigmac" else res["ratio"][name]
        cell = f"{res['median'][name]:.2f} ({min(rates[name]):.2f}-{max(rates[name]):.2f})"
        peak = res["encoder_peak"].get(name)
        lines.append(
            f"  {name:24s}{res['splits'][name]:>7s}{cell:>29s}{'':17s}{ratio:9.3f}"
            f"{max(rates['bigmac']) / max(rates[name]):7.3f}{sim['bigmac'] / sim[name]:10.3f}"
            f"{res['messages'][name]:10.0f}{'-' if peak is None else f'{peak / 2**20:.1f} MiB':>14s}"
        )
    lines.append("  split sweep, simulated samples/s by blocks on stage 0 + stage 1 (* = tuned):")
    for layout, rates_by_split in cal.sweep.items():
        tuned = split_point(f"{layout}_tuned", cal, w)
        cells = [f"{s}+{w.blocks - s}{'*' if s == tuned else ''} {r:.1f}" for s, r in rates_by_split.items()]
        lines.append(f"    {layout:20s}" + ", ".join(cells))
    overall = sim["bigmac"] / sim["megatron_tuned"]
    lines.append(
        f"  bigmac / {REPACKED} at its best split, simulated: {res['schedule_edge']:.3f}, the schedule's "
        f"edge on equal packing (bigmac / megatron_tuned, simulated: {overall:.3f})"
    )
    return "\n".join(lines)


def plot(results: Sequence[tuple[Workload, dict[str, Any]]], path: Path) -> None:
    """Grouped bars: samples/s per setup at each encoder share, range over repeats as error bars,
    simulated samples/s as black marks; above each bar its blocks per stage and bigmac's measured
    ratio over it."""
    fig = figure(figsize=(10, 4.5))
    ax = fig.subplots()
    width = 0.8 / len(SETUPS)
    for i, name in enumerate(SETUPS):
        xs = [g + (i - (len(SETUPS) - 1) / 2) * width for g in range(len(results))]
        med = [res["median"][name] for _, res in results]
        lo = [m - min(res["samples_per_s"][name]) for m, (_, res) in zip(med, results, strict=True)]
        hi = [max(res["samples_per_s"][name]) - m for m, (_, res) in zip(med, results, strict=True)]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=name)
        sim = [res["predicted"][name] for _, res in results]
        ax.plot(xs, sim, "k_", markersize=10, label="simulated" if i == 0 else None)
        for x, (_, res) in zip(xs, results, strict=True):
            top = max(*res["samples_per_s"][name], res["predicted"][name])
            ratio = "" if name == "bigmac" else f"\n{res['ratio'][name]:.2f}"
            ax.annotate(
                f"{res['splits'][name]}{ratio}",
                (x, top),
                ha="center",
                va="bottom",
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=6,
            )
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([f"encoder {res['shares']['encoder']:.0%} of compute" for _, res in results])
    ax.set_ylabel("samples / s (median of repeats)")
    ax.set_title(
        "Training throughput, pp=2 gloo processes x 1 thread (above a bar: blocks per stage, bigmac / setup)",
        fontsize=9,
    )
    ax.legend(loc="upper right", fontsize=7, ncols=2)
    fig.tight_layout()
    save(fig, path)


def headline(res: dict[str, Any]) -> dict[str, float]:
    """The last line: bigmac over each setup (tuned first), ideal's peak encoder bytes over bigmac's."""
    ratio = res["ratio"]
    return {
        "bigmac_vs_megatron_tuned": round(ratio["megatron_tuned"], 4),
        "bigmac_vs_torch_pipelining_tuned": round(ratio["torch_pipelining_tuned"], 4),
        "bigmac_vs_ideal": round(ratio["ideal"], 4),
        "ideal_vs_bigmac_encoder_memory": round(res["memory_ratio"], 4),
        "bigmac_vs_megatron_even": round(ratio["megatron_even"], 4),
        "bigmac_vs_torch_pipelining_even": round(ratio["torch_pipelining_even"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder-layers", default="11,24", help="encoder depths, one per encoder share")
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
        results.append((w, measure_or_exit(w)))
        print(f"encoder layers {layers}: done after {time.perf_counter() - start:.0f} s", flush=True)
    w0, res0 = results[0]
    print(
        f"\nthroughput, pp=2 gloo processes x 1 thread; {w0.microbatches} microbatches per step, token cap "
        f"{w0.token_cap}, {w0.steps} steps ({res0['samples']} samples) per pass, {w0.repeats} interleaved "
        f"passes per setup after a warm-up pass; samples/s median (min-max)\n"
    )
    print("\n\n".join(report(w, res) for w, res in results))
    plot(results, args.out)
    _, last = max(results, key=lambda r: r[1]["shares"]["encoder"])
    figures = headline(last)
    print(
        f"\nat encoder share {last['shares']['encoder']:.1%} (medians of paired ratios): "
        + ", ".join(f"{k} = {v:.3f}" for k, v in figures.items())
        + f"\nchart: {args.out}\ntotal {time.perf_counter() - start:.0f} s; 1-minute load average "
        f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
