"""Build a plan by schedule name: the one entry point the CLI, the strategy and the tests call."""

from __future__ import annotations

from typing import Any

from .config import ScheduleConfig
from .costs import OpCosts
from .dataflow import default_owners
from .nested import build_nested
from .orders import gpipe_order, one_f_one_b_order
from .plan import EB, EF, B, F, G, Op, Plan
from .validate import validate
from .zero_bubble import build_zero_bubble

__all__ = ["build_plan"]


def _llm_order(cfg: ScheduleConfig, rank: int) -> list[Op]:
    """The schedule's LLM order without the backwards a frozen LLM (and encoder) leave out."""
    if cfg.forward_only:  # nothing is kept for a backward: run the forwards chunk by chunk
        return [op for op in gpipe_order(cfg.pp, cfg.vpp, cfg.microbatches) if op.kind == F]
    if cfg.schedule == "gpipe":
        order = gpipe_order(cfg.pp, cfg.vpp, cfg.microbatches)
    else:
        order = one_f_one_b_order(rank, cfg.pp, cfg.vpp, cfg.microbatches)
    return [op for op in order if op.kind in cfg.kinds.run]


def _embedded(cfg: ScheduleConfig) -> Plan:
    """Encoder inside stage 0 (rank 0, chunk 0), generator inside the last stage (last rank, last chunk).

    This is the layout of Megatron-LM's LLaVA, NeMo and torchtitan's VLM: ``EF.j`` runs right
    before stage 0's forward of ``j``, ``EB.j`` right after its backward, and ``G.j`` right after
    the last stage's forward of ``j``. A frozen encoder has no ``EB``.
    """
    p, v, backward = cfg.pp, cfg.vpp, EB in cfg.kinds.run
    ranks = []
    for r in range(p):
        ops: list[Op] = []
        for op in _llm_order(cfg, r):
            if cfg.encoder and r == 0 and op.kind == F and op.chunk == 0:
                ops.append(Op(EF, op.microbatch))
            ops.append(op)
            if backward and r == 0 and op.kind == B and op.chunk == 0:
                ops.append(Op(EB, op.microbatch))
            if cfg.generator and r == p - 1 and op.kind == F and op.chunk == v - 1:
                ops.append(Op(G, op.microbatch))
        ranks.append(tuple(ops))
    return _plan(cfg, ranks)


def _nested_forward_only(cfg: ScheduleConfig) -> Plan:
    """Evaluation with data-parallel encoder and generator: each owner runs its encoder forwards
    first and its generator losses last; in between the rank runs its LLM forwards."""
    owners = cfg.owners if cfg.owners is not None else default_owners(cfg.microbatches, cfg.pp)
    ranks = []
    for r in range(cfg.pp):
        mine = [j for j in range(cfg.microbatches) if owners[j] == r]
        head = [Op(EF, j) for j in mine] if cfg.encoder else []
        tail = [Op(G, j) for j in mine] if cfg.generator else []
        ranks.append((*head, *_llm_order(cfg, r), *tail))
    return _plan(cfg, ranks)


def _plan(cfg: ScheduleConfig, ranks: list) -> Plan:
    return Plan(
        cfg.schedule, cfg.pp, cfg.vpp, cfg.microbatches, tuple(ranks), cfg.encoder, cfg.generator,
        forward_only=cfg.forward_only, frozen=cfg.frozen,
    )  # fmt: skip


def build_plan(
    schedule: str | ScheduleConfig = "bigmac", *, costs: OpCosts | None = None, **fields: Any
) -> Plan:
    """Build and validate the plan of one optimizer step.

    ``build_plan("bigmac", pp=4, vpp=2, microbatches=64)`` or ``build_plan(config)``. ``costs``
    steer bigmac's knob search and the placement of columns; the LLM order depends on them only
    through the ``"auto"`` LLM warm-up, when their transfer latency is above zero.
    Raises ``ValueError`` for a config no builder accepts or an unsafe user-given knob.
    """
    cfg = schedule if isinstance(schedule, ScheduleConfig) else ScheduleConfig(schedule=schedule, **fields)
    costs = costs or OpCosts()
    costs.check_length(cfg.microbatches)
    if cfg.forward_only:
        plan = _nested_forward_only(cfg) if cfg.nested else _embedded(cfg)
    elif cfg.schedule == "bigmac_zb":
        plan = build_zero_bubble(cfg, costs)
    else:
        plan = build_nested(cfg, costs) if cfg.nested else _embedded(cfg)
    validate(plan)
    return plan
