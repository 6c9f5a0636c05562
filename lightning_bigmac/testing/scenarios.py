"""Multi-process scenarios shared by the runtime tests and the overhead benchmark.

:func:`run_cases` runs on every rank of a ``pp x dp`` layout (via :mod:`.spawn`) and executes a
list of cases on one executor per model size, so one process start-up serves many schedules.
Each case is a plain dict:

==============  ==================================================================================
``schedule``    builder name; ``microbatches``: M per data-parallel replica
``data``        ``"mixed"`` (0-3 images, 2-12 tokens), ``"text"`` (no images: a text-only step,
                plan without encoder and generator), ``"image"`` (1-3 images, no text targets),
                ``"equal"`` (every microbatch 3 images, 12 tokens: memory tests), ``"long"`` (0-3
                images, 32-96 tokens: timing)
``measure``     ``"grads"`` (loss + this rank's gradients), ``"memory"`` (activation peaks and unit
                bytes), ``"profile"`` (per-op events gathered on rank 0 and step wall times)
``model``       optional :class:`TinyConfig` field overrides (a bigger model for timing)
``sizes``       optional ``(images, text tokens)`` per microbatch, overriding ``data``'s random sizes
``owners``      optional encoder/generator owner per microbatch (nested schedules), as the balancer gives
``steps``       profile only: steps to run (the first warms up)
``replan``      profile only: after the first step, alternate the plan and the plan re-made from
                the first step's profile (its per-kind means and latency, as
                ``BigMacStrategy(costs="profile")``)
``match_by_order``  pair messages by posting order only, as NCCL does (see ``Transport``)
``forward_only``    an evaluation step (loss only, no gradients)
``generator``       False: the step has no generator work (default: whether it has images)
==============  ==================================================================================

:func:`case_microbatches` gives the data of one replica, so the parent can build the single-process
reference over all replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from lightning_bigmac.runtime import OpProfiler, PipelineExecutor, PipelineGroups, Transport, planning_costs
from lightning_bigmac.runtime.grad_sync import DEFAULT_BUCKET_BYTES
from lightning_bigmac.schedule import SCHEDULES, Op, OpCosts, Plan, build_plan

from .tiny_mllm import TinyConfig, TinyMLLM, make_microbatches

__all__ = [
    "PROFILE_MODEL",
    "build_case_plan",
    "case_config",
    "case_microbatches",
    "exchange_messages",
    "group_timeouts",
    "layout_cases",
    "message_tree",
    "run_cases",
    "skewed_clocks",
]

_SMALL_BUCKETS = 16 * 1024
"""Gradient buckets with data parallelism in tests: the tiny model then needs several buckets."""

_DATA = {
    "mixed": {"images": (0, 3), "text": (2, 12)},
    "text": {"images": (0, 0), "text": (2, 12)},
    "image": {"images": (1, 3), "text": (1, 1)},
    "equal": {"images": (3, 3), "text": (12, 12), "equal": True},
    "long": {"images": (0, 3), "text": (32, 96)},
}


PROFILE_MODEL = {"dim": 384, "heads": 6, "layers": 4, "patches": 16, "patch_dim": 48, "max_len": 160}


def layout_cases(pp: int, dp: int, vpp: int) -> list[dict]:
    """The cases the runtime tests run on one layout, in one spawn.

    Every schedule valid for ``vpp`` (gradient check), a text-only and an image-only step (of
    bigmac and of bigmac_zb) and a bigmac_zb step without a generator; P=4 adds ideal, bigmac and
    bigmac_zb paired by posting order (NCCL's rule); P=2 adds memory cases at M = 4P and 16P and
    profiled steps of a bigger model.
    """
    valid = [s for s in SCHEDULES if not (s == "1f1b" and vpp > 1) and not (s == "interleaved" and vpp == 1)]
    m = 2 * pp
    cases = [{"schedule": s, "microbatches": m} for s in valid]
    cases += [
        {"schedule": "bigmac", "microbatches": m, "data": "text", "seed": 7},
        {"schedule": "bigmac", "microbatches": m, "data": "image", "seed": 8},
        {"schedule": "1f1b" if vpp == 1 else "interleaved", "microbatches": m, "data": "text", "seed": 9},
        {"schedule": "bigmac", "microbatches": m, "forward_only": True, "seed": 10},
        {"schedule": "megatron", "microbatches": m, "forward_only": True, "seed": 11},
        {"schedule": "bigmac_zb", "microbatches": m, "data": "text", "seed": 12},
        {"schedule": "bigmac_zb", "microbatches": m, "data": "image", "seed": 13},
        {"schedule": "bigmac_zb", "microbatches": m, "generator": False, "seed": 14},
    ]
    if pp == 4:  # NCCL's matching rule (posting order, no tags) on the schedules that reorder most
        reordering = ("ideal", "bigmac", "bigmac_zb")
        cases += [{"schedule": s, "microbatches": 2 * m, "match_by_order": True} for s in reordering]
    if (pp, dp, vpp) == (2, 1, 1):
        cases += [
            {"schedule": s, "microbatches": m, "data": "equal", "measure": "memory"}
            for s in ("bigmac", "ideal", "bigmac_zb")
            for m in (4 * pp, 16 * pp)
        ]
        cases += [
            {
                "schedule": s,
                "microbatches": 4 * pp,
                "data": "long",
                "measure": "profile",
                "model": PROFILE_MODEL,
            }
            for s in ("bigmac", "1f1b")
        ]
    return cases


def case_config(case: dict[str, Any]) -> TinyConfig:
    return replace(TinyConfig(), **case.get("model", {}))


def case_microbatches(case: dict[str, Any], dp_rank: int) -> list[dict[str, torch.Tensor]]:
    """Replica ``dp_rank``'s microbatches of ``case`` (deterministic)."""
    kind = case.get("data", "mixed")
    mbs = make_microbatches(
        case_config(case),
        case["microbatches"],
        seed=1000 * dp_rank + case.get("seed", 0),
        sizes=case.get("sizes"),
        **_DATA[kind],
    )
    if kind == "image":
        for mb in mbs:
            mb["labels"].fill_(-100)
    return mbs


def build_case_plan(case: dict[str, Any], pp: int, vpp: int, costs: OpCosts | None = None):
    multimodal = case.get("data", "mixed") != "text"
    return build_plan(
        case["schedule"],
        costs=costs,
        pp=pp,
        vpp=vpp,
        microbatches=case["microbatches"],
        encoder=multimodal,
        generator=case.get("generator", multimodal),
        forward_only=case.get("forward_only", False),
        owners=case.get("owners"),
    )


def _grads(model: TinyMLLM) -> dict[str, torch.Tensor]:
    return {
        name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
        if not p.is_meta
    }


def run_cases(
    rank: int, pp: int, dp: int, vpp: int, cases: list[dict[str, Any]], timeout: float = 60.0
) -> list:
    """Run ``cases`` on this rank; returns one dict per case (see the module docstring)."""
    groups = PipelineGroups.create(pp, dp)
    executors: dict[tuple, tuple[TinyMLLM, PipelineExecutor]] = {}
    out = []
    for case in cases:
        cfg = case_config(case)
        ordered = case.get("match_by_order", False)
        timing = case.get("measure") == "profile"  # without the activation meter's hooks
        key = (tuple(sorted(case.get("model", {}).items())), ordered, timing)
        if key not in executors:
            model = TinyMLLM(cfg, seed=0)
            ex = PipelineExecutor(
                model.parts(),
                groups,
                vpp=vpp,
                bucket_bytes=_SMALL_BUCKETS if dp > 1 else DEFAULT_BUCKET_BYTES,
                timeout=timeout,
                measure_memory=not timing,
                profile=True,
                match_by_order=ordered,
            )
            executors[key] = (model, ex)
        model, ex = executors[key]
        plan = build_case_plan(case, pp, vpp)
        mbs = case_microbatches(case, groups.dp_rank)
        measure = case.get("measure", "grads")
        if measure == "profile":
            replan = partial(build_case_plan, case, pp, vpp) if case.get("replan") else None
            out.append(_profile(ex, plan, mbs, case.get("steps", 3), replan))
            continue
        for p in ex.parameters():
            p.grad = None
        res = ex.step(plan, mbs)
        if measure == "grads":
            out.append({"loss": res.loss, "grads": _grads(model)})
        else:
            assert ex.memory is not None
            out.append({"peak": res.activation_peak, "units": dict(ex.memory.unit_bytes)})
    return out


def _profile(
    ex: PipelineExecutor, plan: Plan, mbs, steps: int, replan: Callable[[OpCosts], Plan] | None = None
) -> dict[str, Any]:
    """Run ``steps`` steps; per step the events of every rank (on pipeline rank 0), the wall time
    and the plan.

    The wall time runs from the profiler's start barrier (where the events' clock starts) to
    ``step``'s return on this rank, gradient sync included: the barrier itself, which only lines
    up the ranks' clocks, and the wait for the other rank to reach it are not the runtime's.
    ``replan(costs) -> Plan``: after the first step, re-plan with that step's
    :func:`planning_costs` (on pipeline rank 0, sent to the others), as
    ``BigMacStrategy(costs="profile")`` does, and alternate the two plans step by step from then
    on, so that both are timed under the same machine load; such records carry ``tuned``.
    """
    assert ex.profiler is not None
    group = ex.groups.pipeline_group
    records, plans = [], [plan]
    for step in range(steps):
        for p in ex.parameters():
            p.grad = None
        run = plans[step % len(plans)]
        ex.step(run, mbs)
        wall = ex.profiler.now()
        events = ex.profiler.gather(group, dst=ex.groups.pipeline_ranks[0])
        records.append({"events": events, "wall": wall, "plan": run.to_dict(), "tuned": run is not plan})
        if step == 0 and replan is not None:
            box = [None if events is None else replan(planning_costs(plan, events))]
            dist.broadcast_object_list(box, src=ex.groups.pipeline_ranks[0], group=group)
            plans.append(box[0])
    return {"plan": plans[-1].to_dict(), "records": records}


def group_timeouts(rank: int, pp: int, dp: int, timeout: float) -> list[float]:
    """The timeout, in seconds, of every process group :class:`PipelineGroups` creates with ``timeout``."""
    groups = PipelineGroups.create(pp, dp, timeout=timeout)
    made = [groups.pipeline_group, groups.dp_group, *groups.channels.values()]
    return [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in made]


def message_tree() -> dict[str, Any]:
    """What :func:`exchange_messages` sends: every kind of leaf a stage may pass on."""
    return {
        "h": torch.arange(6.0).reshape(2, 3).requires_grad_(),
        "ids": torch.arange(4),
        "empty": torch.zeros(0, 5, requires_grad=True),
        "unused": torch.ones(3, requires_grad=True),
        "none": None,
        "nested": [torch.ones(2, dtype=torch.bfloat16)],
    }


def exchange_messages(rank: int, match_by_order: bool, inline_bytes: int | None) -> dict[str, Any]:
    """Pipeline rank 0 sends :func:`message_tree`, a list of 300 tensors (a long header) and a
    280 KB tensor (larger than gloo's envelope) to rank 1, which answers the first with
    gradients: sevens for ``h``, None for the rest. Returns what each rank received."""
    transport = Transport(
        PipelineGroups.create(2, 1), timeout=30.0, match_by_order=match_by_order, inline_bytes=inline_bytes
    )
    transport.connect()
    wide = [torch.full((1,), float(i)) for i in range(300)]
    big = torch.arange(70_000.0)
    if rank == 0:
        transport.expect(1, [(3, "B0.0", 1)])
        transport.send(message_tree(), 1, 1, what="F0.0")
        transport.send(wide, 1, 2, what="F0.1")
        transport.send(big, 1, 4, what="F0.2")
        got = {"answer": transport.recv(1, 3, what="B0.0")}
    else:
        transport.expect(0, [(1, "F0.0", None), (2, "F0.1", None), (4, "F0.2", None)])
        got = {"tree": transport.recv(0, 1, what="F0.0"), "wide": transport.recv(0, 2, what="F0.1")}
        got["big"] = transport.recv(0, 4, what="F0.2")
        leaves, _ = pytree.tree_flatten(got["tree"])
        answer = [torch.full_like(leaf, 7.0) if leaf is got["tree"]["h"] else None for leaf in leaves]
        transport.send(answer, 0, 3, what="B0.0", answers=1)
    transport.flush()
    assert transport.idle()
    return got


def skewed_clocks(rank: int, skew: float) -> list | None:
    """Both pipeline ranks time one op that starts at the same moment, but rank 1 starts its
    profiler clock ``skew`` seconds after rank 0 (no barrier); returns the gathered events."""
    groups = PipelineGroups.create(2, 1)
    profiler = OpProfiler(rank)
    dist.barrier()
    if rank == 1:
        time.sleep(skew)
    profiler.start_step()
    dist.barrier()
    with profiler.op(Op.parse("F0.0")):
        time.sleep(0.01)
    return profiler.gather(groups.pipeline_group, dst=0)
