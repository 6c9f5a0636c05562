"""Build a plan by schedule name: the one entry point the CLI, the strategy and the tests call."""

from __future__ import annotations

from typing import Any

from .config import ScheduleConfig
from .costs import CostModel
from .nested import build_nested
from .orders import gpipe_order, one_f_one_b_order
from .plan import EB, EF, B, F, G, Op, Plan
from .validate import validate

__all__ = ["build_plan"]


def _embedded(cfg: ScheduleConfig) -> Plan:
    """Encoder inside stage 0 (rank 0, chunk 0), generator inside the last stage (last rank, last chunk).

    This is the layout of Megatron-LM's LLaVA, NeMo and torchtitan's VLM: ``EF.j`` runs right
    before stage 0's forward of ``j``, ``EB.j`` right after its backward, and ``G.j`` right after
    the last stage's forward of ``j``.
    """
    p, v, m = cfg.pp, cfg.vpp, cfg.microbatches
    ranks = []
    for r in range(p):
        llm = gpipe_order(p, v, m) if cfg.schedule == "gpipe" else one_f_one_b_order(r, p, v, m)
        ops: list[Op] = []
        for op in llm:
            if cfg.encoder and r == 0 and op.kind == F and op.chunk == 0:
                ops.append(Op(EF, op.microbatch))
            ops.append(op)
            if cfg.encoder and r == 0 and op.kind == B and op.chunk == 0:
                ops.append(Op(EB, op.microbatch))
            if cfg.generator and r == p - 1 and op.kind == F and op.chunk == v - 1:
                ops.append(Op(G, op.microbatch))
        ranks.append(tuple(ops))
    return Plan(cfg.schedule, p, v, m, tuple(ranks), cfg.encoder, cfg.generator)


def build_plan(
    schedule: str | ScheduleConfig = "bigmac", *, costs: CostModel | None = None, **fields: Any
) -> Plan:
    """Build and validate the plan of one optimizer step.

    ``build_plan("bigmac", pp=4, vpp=2, microbatches=64)`` or ``build_plan(config)``. ``costs``
    steer bigmac's knob search and the placement of columns; the LLM order never depends on them.
    Raises ``ValueError`` for a config no builder accepts or an unsafe user-given knob.
    """
    cfg = schedule if isinstance(schedule, ScheduleConfig) else ScheduleConfig(schedule=schedule, **fields)
    costs = costs or CostModel()
    costs.check_length(cfg.microbatches)
    plan = build_nested(cfg, costs) if cfg.schedule in ("ideal", "bigmac") else _embedded(cfg)
    validate(plan)
    return plan
