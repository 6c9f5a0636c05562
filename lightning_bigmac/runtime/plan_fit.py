"""Which parts of a model train, and whether a plan fits the executor and the model it is to run on.

A part without a trainable parameter is *frozen* (:attr:`~lightning_bigmac.schedule.Plan.frozen`):
its plan drops the backward ops that would compute nothing. The LLM part is the embedding, every
block and the head together. The planner derives the set from ``requires_grad`` for every step, so
a part frozen or unfrozen between steps gets the plan it needs; the executor refuses a plan that
calls a part frozen while this rank still holds trainable parameters of it, which would silently
get no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_bigmac.schedule import Plan

from .parts import PipelineParts

__all__ = ["check_plan", "frozen_parts"]


def _trainable(modules: Sequence[nn.Module | None]) -> list[str]:
    return [n for m in modules if m is not None for n, p in m.named_parameters() if p.requires_grad]


def frozen_parts(parts: PipelineParts) -> frozenset[str]:
    """The parts of ``parts`` (of ``encoder``, ``llm``, ``generator``) with no trainable parameter."""
    llm = [parts.embedding, *parts.blocks, parts.head]
    candidates = {"encoder": [parts.encoder], "llm": llm, "generator": [parts.generator]}
    return frozenset(
        name
        for name, modules in candidates.items()
        if any(m is not None for m in modules) and not _trainable(modules)
    )


def check_plan(
    plan: Plan, microbatches: int, parts: PipelineParts, stages: Sequence[nn.Module], layout: tuple[int, int]
) -> None:
    """Raise ``ValueError`` unless ``plan`` fits: the executor's ``layout`` (pp, vpp), a step of
    ``microbatches``, the parts the model has, and the parts it trains (``stages``: this rank's)."""
    if (plan.pp, plan.vpp) != layout:
        raise ValueError(
            f"plan has pp={plan.pp}, vpp={plan.vpp} but the executor was built for pp={layout[0]}, "
            f"vpp={layout[1]}: build the plan with the executor's layout"
        )
    if microbatches != plan.microbatches:
        raise ValueError(
            f"got {microbatches} microbatches for a plan of microbatches={plan.microbatches}: "
            "give every pipeline rank the whole step's microbatch list"
        )
    for module in ("encoder", "generator"):
        if getattr(plan, module) and getattr(parts, module) is None:
            raise ValueError(
                f"the plan has {module} work but PipelineParts.{module} is None: build the plan "
                f"with {module}=False or give the parts a {module}"
            )
    held = {"encoder": [parts.encoder], "llm": list(stages), "generator": [parts.generator]}
    for module in sorted(plan.frozen):
        trainable = _trainable(held[module])
        if trainable:
            names = ", ".join(trainable[:3]) + (", ..." if len(trainable) > 3 else "")
            raise ValueError(
                f"the plan says {module} is frozen but it has trainable parameters ({names}): they would "
                "get no gradient. Plan with frozen=frozen_parts(parts) (lightning_bigmac.runtime.plan_fit), "
                "or requires_grad_(False) them"
            )
