"""Bytes per rank for a model, a pipeline layout and memory options, before any device is touched.

Per rank and part: weights, gradients and optimizer states from the parameters the rank holds,
divided by the ranks sharing a replica at the chosen shard level (ZeRO-1/2/3 arithmetic); saved
activations from the plan's peak live microbatches times one microbatch's bytes
(:mod:`.spec`); receive buffers from the messages in flight on the simulated timeline. The
encoder and the generator are replicated on every rank of the ``pp x dp`` grid, as the runtime
places them under every schedule (so their replicas shard over ``pp * dp`` ranks); an LLM stage
is replicated over ``dp``.

Sharded replicas and recompute are estimates of options the runtime does not implement yet:

* shard level ``optimizer`` divides optimizer states by the group, ``gradients`` also gradients,
  ``parameters`` also weights, and then a rank holds two gathered layers of weights (the one
  computing and the one prefetched) and one layer of unreduced gradients;
* recompute checkpoints every layer of a part: each layer keeps only its input (``h`` per token),
  and the backward of one layer recomputes that layer's activations of one microbatch, which the
  rank holds on top of the saved ones (one part at a time: a rank runs one op at a time).

Not counted: autograd's temporary buffers inside an op, collective buffers, the CUDA context and
allocator fragmentation; :attr:`MemoryOptions.reserved` is a flat allowance for them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from lightning_bigmac.runtime.partition import balanced_bounds
from lightning_bigmac.schedule import OpCosts, Plan, build_plan, simulate
from lightning_bigmac.schedule.plan import EB, EF, MODULES, Op

from .plan_memory import transport_peaks, weighted_peaks
from .spec import ModelSpec, PartSpec, Workload

__all__ = [
    "GIB",
    "PRECISION_BYTES",
    "SHARD_LEVELS",
    "FitEstimate",
    "MemoryOptions",
    "RankMemory",
    "estimate_fit",
]

GIB = 2**30
SHARD_LEVELS = ("none", "optimizer", "gradients", "parameters")
"""ZeRO stages 0-3: what a part's replica divides over the ranks that hold it."""
PRECISION_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}
"""Bytes per parameter of (weights, gradients, optimizer states) with Adam: ``bf16`` keeps bf16
weights and gradients and an fp32 master copy plus two moments; ``fp32`` keeps fp32 weights and
gradients and two moments (Lightning's ``bf16-mixed`` is ``fp32`` here: its parameters stay fp32)."""


@dataclass(frozen=True, kw_only=True)
class MemoryOptions:
    """How a rank stores its parts, and the device it must fit."""

    precision: str = "bf16"
    """A key of :data:`PRECISION_BYTES`."""
    shard: str | Mapping[str, str] = "none"
    """One of :data:`SHARD_LEVELS` for every part, or a level per part (missing parts: ``none``)."""
    recompute: str | Collection[str] = frozenset()
    """Parts whose layers recompute their activations in backward (names, or ``"llm,encoder"``)."""
    device_memory: float = 80 * GIB
    """Bytes of one device."""
    reserved: float = 4 * GIB
    """Bytes of each device not available to the estimate's terms (CUDA context, NCCL, allocator
    slack): an allowance, not a measurement."""

    def __post_init__(self) -> None:
        shard = self.shard
        levels = (
            dict.fromkeys(MODULES, shard)
            if isinstance(shard, str)
            else {**dict.fromkeys(MODULES, "none"), **shard}
        )
        names = self.recompute.split(",") if isinstance(self.recompute, str) else self.recompute
        object.__setattr__(self, "shard", levels)
        object.__setattr__(self, "recompute", frozenset(n.strip() for n in names if n.strip()))
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"precision={self.precision!r}: choose one of {', '.join(PRECISION_BYTES)}")
        for part, level in levels.items():
            if part not in MODULES:
                raise ValueError(f"shard names part {part!r}: name parts among {', '.join(MODULES)}")
            if level not in SHARD_LEVELS:
                raise ValueError(f"shard level {level!r} for {part}: choose one of {', '.join(SHARD_LEVELS)}")
        unknown = sorted(set(self.recompute) - set(MODULES))
        if unknown:
            raise ValueError(f"recompute names {unknown}: name parts among {', '.join(MODULES)}")
        if not 0 <= self.reserved < self.device_memory:
            raise ValueError(
                f"reserved={self.reserved / GIB:.1f} GiB must be below "
                f"device_memory={self.device_memory / GIB:.1f} GiB: lower the reserve or raise the memory"
            )


@dataclass(frozen=True)
class RankMemory:
    """One rank's bytes, per part where a part owns them."""

    rank: int
    weights: dict[str, float]
    gradients: dict[str, float]
    optimizer: dict[str, float]
    activations: dict[str, float]
    """Saved for backward at the part's peak (recompute applied)."""
    peak_live: dict[str, int]
    """The plan's most microbatch units of each part alive at once on this rank (LLM: chunk units)."""
    recompute: float
    """One layer's activations of one microbatch, rebuilt during a recomputing backward."""
    gathered: float
    """Gathered layers of parts whose parameters are sharded."""
    transport: float
    """Receive buffers of messages in flight."""

    @property
    def total(self) -> float:
        parts = (self.weights, self.gradients, self.optimizer, self.activations)
        return sum(sum(d.values()) for d in parts) + self.recompute + self.gathered + self.transport

    def to_dict(self) -> dict:
        keys = ("weights", "gradients", "optimizer", "activations", "peak_live")
        out = {"rank": self.rank, **{k: dict(getattr(self, k)) for k in keys}}
        return {**out, "recompute": self.recompute, "gathered": self.gathered,
                "transport": self.transport, "total": self.total}  # fmt: skip


@dataclass(frozen=True)
class FitEstimate:
    """The estimate for one layout: every rank's bytes, the plan's simulated step time, the verdict."""

    plan: Plan = field(repr=False)
    dp: int
    options: MemoryOptions
    ranks: tuple[RankMemory, ...]
    step_time: float
    """Simulated step time, in the cost model's unit (default unit costs: an LLM chunk forward is 1)."""
    lower_bound: float

    @property
    def busiest(self) -> RankMemory:
        """The rank that needs the most bytes."""
        return max(self.ranks, key=lambda r: r.total)

    @property
    def budget(self) -> float:
        return self.options.device_memory - self.options.reserved

    @property
    def fits(self) -> bool:
        return self.busiest.total <= self.budget

    def to_dict(self) -> dict:
        p = self.plan
        opts = self.options
        return {
            "schedule": p.schedule, "pp": p.pp, "vpp": p.vpp, "dp": self.dp, "microbatches": p.microbatches,
            "frozen": sorted(p.frozen), "knobs": dict(p.knobs), "precision": opts.precision,
            "shard": dict(opts.shard), "recompute": sorted(opts.recompute),
            "device_memory": opts.device_memory, "reserved": opts.reserved, "step_time": self.step_time,
            "lower_bound": self.lower_bound, "fits": self.fits, "busiest_rank": self.busiest.rank,
            "ranks": [r.to_dict() for r in self.ranks],
        }  # fmt: skip


@dataclass(frozen=True)
class _Part:
    """One microbatch's bytes of a part: what a layer saves, a layer's input (all a recomputing
    layer keeps), and what sits around the layers."""

    saved_per_layer: float
    input_per_layer: float
    around: float
    """Bytes around the layers: final norm and output projection (and the LLM's logits, separately)."""

    def unit(self, layers: float, recompute: bool) -> float:
        return layers * (self.input_per_layer if recompute else self.saved_per_layer) + self.around


def _part(spec: PartSpec, tokens: int, wl: Workload) -> _Part:
    ab = wl.activation_bytes
    return _Part(
        tokens * spec.layer_elements() * ab, tokens * spec.hidden * ab, tokens * 2 * spec.hidden * ab
    )


def estimate_fit(
    model: ModelSpec,
    workload: Workload,
    *,
    schedule: str = "bigmac",
    pp: int,
    vpp: int = 1,
    dp: int = 1,
    microbatches: int,
    frozen: Collection[str] = frozenset(),
    options: MemoryOptions | None = None,
    costs: OpCosts | None = None,
) -> FitEstimate:
    """Per-rank bytes of ``model`` trained on microbatches like ``workload`` under the plan that
    ``build_plan(schedule, pp=pp, vpp=vpp, microbatches=microbatches, frozen=frozen)`` makes, on ``dp``
    pipelines (module docstring). ``costs`` time the plan (default: unit costs)."""
    options = options or MemoryOptions()
    model.check()
    wl = workload.resolved(model)
    if dp < 1:
        raise ValueError(f"dp={dp} must be >= 1 (data-parallel pipelines)")
    costs = costs or OpCosts()
    plan = build_plan(
        schedule, pp=pp, vpp=vpp, microbatches=microbatches, encoder=model.encoder is not None,
        generator=model.generator is not None, frozen=frozen, costs=costs,
    )  # fmt: skip
    sim = simulate(plan, costs, check=False)
    llm = model.llm
    bounds = balanced_bounds([1.0] * llm.layers, pp * vpp)
    stage_layers = [bounds[s + 1] - bounds[s] for s in range(pp * vpp)]
    last = pp * vpp - 1
    tokens = {"encoder": wl.encoder_tokens, "llm": wl.sequence, "generator": wl.generator_tokens}
    sizes = {name: _part(spec, tokens[name], wl) for name, spec in model.parts().items()}
    logits = wl.sequence * llm.vocab * wl.logits_bytes
    recompute = options.recompute

    def llm_unit(rank: int, op: Op) -> float:
        stage = op.chunk * pp + rank
        unit = sizes["llm"].unit(stage_layers[stage], "llm" in recompute)
        return unit + logits if stage == last else unit - sizes["llm"].around  # the head is on the last

    def message(src: Op, dst: Op) -> float:
        encoder_side = {src.kind, dst.kind} & {EF, EB}  # encoder outputs or their gradients
        return (wl.image_tokens if encoder_side else wl.sequence) * llm.hidden * wl.activation_bytes

    llm_peaks = weighted_peaks(plan, "llm", llm_unit)
    transport = transport_peaks(sim, message)
    w_bytes, g_bytes, o_bytes = PRECISION_BYTES[options.precision]
    ranks = []
    for r in range(pp):
        held = _held_params(model, stage_layers, pp, r)
        runs = {op.module for op in plan.ranks[r]}
        weights, grads, optim, acts, peak_live = {}, {}, {}, {}, {}
        transient = gathered = 0.0
        for name, spec in model.parts().items():
            level = options.shard[name]
            group = dp if name == "llm" else pp * dp
            trains = name not in plan.frozen
            n = held[name]
            weights[name] = n * w_bytes / (group if level == "parameters" else 1)
            grads[name] = (
                n * g_bytes / (group if level in ("gradients", "parameters") else 1) if trains else 0.0
            )
            optim[name] = n * o_bytes / (group if level != "none" else 1) if trains else 0.0
            peak_live[name] = sim.peak_live[name][r]
            if name == "llm":
                acts[name] = llm_peaks[r]
            else:
                acts[name] = peak_live[name] * sizes[name].unit(spec.layers, name in recompute)
            if name in recompute and peak_live[name]:
                transient = max(transient, sizes[name].saved_per_layer)
            if level == "parameters" and name in runs:
                layer = llm.layer_params if name == "llm" else spec.params / spec.layers
                gathered += layer * (2 * w_bytes + (g_bytes if trains else 0))
        ranks.append(RankMemory(r, weights, grads, optim, acts, peak_live, transient, gathered, transport[r]))
    return FitEstimate(plan, dp, options, tuple(ranks), sim.step_time, sim.lower_bound)


def _held_params(model: ModelSpec, stage_layers: list[int], pp: int, rank: int) -> dict[str, float]:
    """Parameters of each part on ``rank``: every replica whole, the LLM's stages on this rank
    (stage ``c * pp + rank`` for each chunk ``c``), with the embedding on stage 0 and the head on the last."""
    llm = model.llm
    stages = range(rank, len(stage_layers), pp)
    n = sum(stage_layers[s] for s in stages) * llm.layer_params
    n += llm.embedding_params if rank == 0 else 0
    n += llm.head_params if len(stage_layers) - 1 in stages else 0
    return {name: (n if name == "llm" else spec.params) for name, spec in model.parts().items()}
