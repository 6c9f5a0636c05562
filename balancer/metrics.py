"""How good a step's packing is: imbalance ratios, padding, and its simulated ``bigmac`` step time.

The simulator is the schedule planner's (``lightning_bigmac.schedule``); the balancer judges
itself with the same model the strategy plans with. It is imported on first use: importing the
``lightning_bigmac`` package loads torch and Lightning, which the rest of the balancer never needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .cost import SampleCostModel
from .samples import Sample

if TYPE_CHECKING:
    from lightning_bigmac.schedule import OpCosts

__all__ = ["column_imbalance", "llm_imbalance", "padding_waste", "schedule_costs", "step_quality"]


def column_imbalance(owner_costs: Sequence[float], pipeline_size: int) -> float:
    """Mean over groups of (heaviest member / mean member): 1.0 is perfect. Empty columns count as 1."""
    ratios = []
    for g in range(0, len(owner_costs), pipeline_size):
        group = owner_costs[g : g + pipeline_size]
        mean = sum(group) / len(group)
        ratios.append(max(group) / mean if mean > 0 else 1.0)
    return sum(ratios) / len(ratios)


def llm_imbalance(llm_costs: Sequence[float]) -> float:
    """Largest microbatch LLM cost over the mean: 1.0 is perfect."""
    mean = sum(llm_costs) / len(llm_costs)
    return max(llm_costs) / mean if mean > 0 else 1.0


def padding_waste(tokens: Sequence[int]) -> float:
    """Share of token slots that would be padding if every microbatch were padded to the step's longest.

    The runtime sends shapes with every transfer and does not pad; this is what a static-shape
    pipeline would waste, and a direct reading of how uneven the sequence lengths are.
    """
    longest = max(tokens)
    return 1.0 - sum(tokens) / (len(tokens) * longest) if longest else 0.0


def schedule_costs(
    microbatches: Sequence[Sequence[Sample]], model: SampleCostModel, *, pp: int, vpp: int
) -> OpCosts:
    """The schedule simulator's per-microbatch costs for one replica's step."""
    return _schedule_costs([model.op_costs(mb) for mb in microbatches], pp * vpp)


def _schedule_costs(ops: Sequence[Mapping[str, float]], chunks: int) -> OpCosts:
    from lightning_bigmac.schedule import OpCosts

    def column(name: str, divide: int = 1) -> tuple[float, ...]:
        return tuple(o[name] / divide for o in ops)

    return OpCosts(
        encoder_forward=column("encoder_forward"),
        encoder_backward=column("encoder_backward"),
        llm_forward=column("llm_forward", chunks),  # the simulator times one LLM chunk at a time
        llm_backward=column("llm_backward", chunks),
        generator=column("generator"),
    )


def step_quality(
    microbatches: Sequence[Sequence[Sample]],
    owners: Sequence[int],
    model: SampleCostModel,
    *,
    pp: int,
    vpp: int,
    simulate_step: bool = True,
) -> dict[str, Any]:
    """Imbalances, padding and (optionally) the simulated ``bigmac`` step time of one replica's step.

    Costs are the microbatches' op durations (:meth:`SampleCostModel.op_costs`, overheads and attention
    over the pack included), the same numbers the simulator is fed.
    """
    ops = [model.op_costs(mb) for mb in microbatches]
    out: dict[str, Any] = {
        "encoder_imbalance": column_imbalance(
            [o["encoder_forward"] + o["encoder_backward"] + o["generator"] for o in ops], pp
        ),
        "llm_imbalance": llm_imbalance([o["llm_forward"] + o["llm_backward"] for o in ops]),
        "padding_waste": padding_waste([sum(model.spans(s).llm_tokens for s in mb) for mb in microbatches]),
    }
    if simulate_step:
        from lightning_bigmac.schedule import build_plan, simulate

        sched = _schedule_costs(ops, pp * vpp)
        plan = build_plan(
            "bigmac",
            pp=pp,
            vpp=vpp,
            microbatches=len(microbatches),
            owners=list(owners),
            costs=sched,
            encoder=any(sched.encoder_forward),
            generator=any(sched.generator),
        )
        sim = simulate(plan, sched, check=False)
        out["step_time"] = sim.step_time
        out["lower_bound"] = sim.lower_bound
    return out
