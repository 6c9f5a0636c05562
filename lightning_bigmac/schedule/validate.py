"""Prove a plan complete and deadlock-free before anything runs it.

A plan is *complete* when every op of the step appears exactly once, on a legal rank, and the
encoder work of a microbatch (forward and backward) stays on one rank, as does a split
generator's (``GI`` and ``GW``). The step's ops are those its modules need: a plan with frozen
modules must leave out the backward ops they make pointless (``EB`` of a frozen encoder, ...:
:func:`~lightning_bigmac.schedule.plan.step_kinds`). It is *deadlock-free*
when the graph of program order on each rank plus the data dependencies of
:mod:`~lightning_bigmac.schedule.dataflow` is acyclic: then any op durations give a valid
execution, provided sends do not block the sender (the runtime's sends are asynchronous).
"""

from __future__ import annotations

from collections.abc import Iterable
from graphlib import CycleError, TopologicalSorter

from .dataflow import DataFlow, PlacedOp
from .plan import EB, EF, GI, GW, LLM_KINDS, SPLIT_KINDS, B, G, Op, Plan

__all__ = ["PlanError", "render_grid", "validate"]


class PlanError(ValueError):
    """A plan is incomplete or would deadlock. ``ops`` are the placed ops at fault."""

    def __init__(self, message: str, plan: Plan, ops: Iterable[PlacedOp] = ()):
        self.ops = tuple(ops)
        self.grid = render_grid(plan, self.ops) if self.ops else ""
        super().__init__(message + ("\n" + self.grid if self.grid else ""))


def render_grid(plan: Plan, marked: Iterable[PlacedOp], context: int = 6) -> str:
    """Rank-by-step grid around the marked ops, each marked one written ``>op<``.

    Only the steps near a marked op are shown so that a 10k-op plan still gives a short message.
    """
    marked = set(marked)
    steps = {(r, i) for r, ops in enumerate(plan.ranks) for i, op in enumerate(ops) if (r, op) in marked}
    if not steps:
        return ""
    lo = max(0, min(i for _, i in steps) - context)
    hi = max(i for _, i in steps) + context + 1
    if hi - lo > 60:  # marks far apart: keep a window around each rank's first mark only
        hi = lo + 60
    lines = [f"steps {lo}..{hi - 1} (>op< marks the ops at fault):"]
    for r, ops in enumerate(plan.ranks):
        cells = [(f">{op}<" if (r, i) in steps else str(op)) for i, op in enumerate(ops[lo:hi], start=lo)]
        lines.append(f"  PP{r}: " + " ".join(cells))
    return "\n".join(lines)


def _check_complete(plan: Plan) -> None:
    seen: dict[tuple[int, Op], tuple[int, int]] = {}
    for r, ops in enumerate(plan.ranks):
        for step, op in enumerate(ops):
            where = f"rank {r} step {step}"
            problem = None
            if not 0 <= op.microbatch < plan.microbatches:
                problem = f"microbatch {op.microbatch} outside 0..{plan.microbatches - 1}"
            elif op.kind in LLM_KINDS and not 0 <= op.chunk < plan.vpp:
                problem = f"chunk {op.chunk} outside 0..{plan.vpp - 1}"
            elif op.module == "encoder" and not plan.encoder:
                problem = "the plan says encoder=False"
            elif op.module == "generator" and not plan.generator:
                problem = "the plan says generator=False"
            elif op.kind in (B, EB) and plan.forward_only:
                problem = "the plan is forward-only"
            elif op.kind in SPLIT_KINDS and not plan.split_backward:
                problem = "the plan says split_backward=False: its backward ops are B and G"
            elif op.kind in (B, G) and plan.split_backward:
                problem = "the plan says split_backward=True: its backward ops are I and W, GI and GW"
            elif op.kind not in plan.kinds.run:
                problem = (
                    f"the plan says frozen={','.join(sorted(plan.frozen))}, which leaves nothing for "
                    f"{op.kind} ops to compute"
                )
            if problem:
                raise PlanError(f"{op} on {where}: {problem}", plan, [(r, op)])
            key = (r, op) if op.kind in LLM_KINDS else (-1, op)
            if key in seen:
                r0, s0 = seen[key]
                raise PlanError(
                    f"duplicate op {op}: on rank {r0} step {s0} and again on {where}",
                    plan,
                    [(r0, op), (r, op)],
                )
            seen[key] = (r, step)
    missing = [p for p in plan.step_ops() if p not in seen]
    if missing:
        shown = ", ".join(f"{op}" + (f" on rank {r}" if r >= 0 else "") for r, op in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise PlanError(f"incomplete plan: missing {shown}{more}", plan)
    run = plan.kinds.run
    pairs = [(first, then) for first, then in ((EF, EB), (GI, GW)) if then in run]
    for first, then in pairs:
        for j in range(plan.microbatches):
            (r0, _), (r1, _) = seen[(-1, Op(first, j))], seen[(-1, Op(then, j))]
            if r0 != r1:
                raise PlanError(
                    f"{then}.{j} is on rank {r1} but {first}.{j} on rank {r0}: it reads what {first}.{j} "
                    "kept, so both must run on the same rank (the microbatch's owner)",
                    plan,
                    [(r0, Op(first, j)), (r1, Op(then, j))],
                )


def validate(plan: Plan) -> DataFlow:
    """Raise :class:`PlanError` unless ``plan`` is complete and deadlock-free; return its data flow.

    The error names the missing or duplicated op, or the ops on a dependency cycle, and shows the
    rank-by-step grid with those ops marked.
    """
    if plan.pp < 1 or plan.vpp < 1 or plan.microbatches < 1:
        raise PlanError(
            f"pp, vpp and microbatches must be >= 1, got {plan.pp}, {plan.vpp}, {plan.microbatches}", plan
        )
    _check_complete(plan)
    flow = DataFlow.of_plan(plan)

    graph: dict[PlacedOp, list[PlacedOp]] = {}
    for r, ops in enumerate(plan.ranks):
        prev = None
        for op in ops:
            preds = list(flow.producers(r, op))
            if prev is not None:
                preds.append((r, prev))
            graph[(r, op)] = preds
            prev = op
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as err:
        cycle: list[PlacedOp] = err.args[1]
        # graphlib lists the cycle as a chain of predecessors; print it in execution order.
        chain = " -> ".join(f"{op}@PP{r}" for r, op in reversed(cycle))
        raise PlanError(
            f"deadlock: these ops wait on each other in a cycle (program order on a rank, or data "
            f"flow between ranks): {chain}",
            plan,
            cycle,
        ) from None
    return flow
