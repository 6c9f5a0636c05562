"""LLM op orders per rank: GPipe, 1F1B and Megatron's interleaved 1F1B.

These are the LLM halves of every schedule. The encoder/generator placements
(:mod:`~lightning_bigmac.schedule.builders`) never reorder them; BigMac only lengthens the
warm-up (``extra_warmup``) and delays ops by inserting columns.

Megatron-LM's interleaved schedule (Narayanan et al. 2021, ``schedules.py`` in Megatron-Core):
the ``k``-th forward of a rank runs chunk ``(k // pp) % vpp`` on microbatch
``(k // (pp * vpp)) * pp + k % pp``; backwards run the chunks in reverse. Rank ``r`` warms up
with ``2 * (pp - r - 1) + (vpp - 1) * pp`` forwards, then alternates one forward and one
backward, so ``warmup + 1`` forwards precede the first backward (11, 9, 7, 5 for pp=4, vpp=2).
"""

from __future__ import annotations

from .plan import B, F, Op

__all__ = ["gpipe_order", "llm_sequence", "megatron_warmup", "one_f_one_b_order"]


def llm_sequence(kind: str, pp: int, vpp: int, microbatches: int) -> list[Op]:
    """One rank's forwards (``kind`` F) or backwards (B, or I of a split backward) in Megatron's
    order: chunk by chunk in groups of ``pp`` microbatches; backwards take the chunks in reverse."""
    if vpp == 1:
        return [Op(kind, j, 0) for j in range(microbatches)]
    ops = []
    for k in range(microbatches * vpp):
        chunk = (k // pp) % vpp
        if kind != F:
            chunk = vpp - 1 - chunk
        ops.append(Op(kind, (k // (pp * vpp)) * pp + k % pp, chunk))
    return ops


def megatron_warmup(rank: int, pp: int, vpp: int, microbatches: int) -> int:
    """Forwards Megatron runs on ``rank`` before its steady 1F1B phase (capped at the total)."""
    total = microbatches * vpp
    if vpp == 1:
        return min(pp - rank - 1, total)
    return min(2 * (pp - rank - 1) + (vpp - 1) * pp, total)


def one_f_one_b_order(rank: int, pp: int, vpp: int, microbatches: int, extra_warmup: int = 0) -> list[Op]:
    """1F1B (``vpp == 1``) or interleaved 1F1B order of one rank, warm-up lengthened by ``extra_warmup``."""
    fwd = llm_sequence(F, pp, vpp, microbatches)
    bwd = llm_sequence(B, pp, vpp, microbatches)
    warmup = min(megatron_warmup(rank, pp, vpp, microbatches) + extra_warmup, len(fwd))
    order = fwd[:warmup]
    for i, f in enumerate(fwd[warmup:]):
        order += [f, bwd[i]]
    order += bwd[len(fwd) - warmup :]
    return order


def gpipe_order(pp: int, vpp: int, microbatches: int) -> list[Op]:
    """All forwards (chunk by chunk), then all backwards in reverse chunk order; same on every rank."""
    fwd = [Op(F, j, c) for c in range(vpp) for j in range(microbatches)]
    bwd = [Op(B, j, c) for c in reversed(range(vpp)) for j in range(microbatches)]
    return fwd + bwd
