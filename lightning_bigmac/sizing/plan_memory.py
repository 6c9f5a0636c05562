"""Bytes a plan keeps on each rank beyond what unit counts say: units of unequal size, and messages.

:attr:`~lightning_bigmac.schedule.Simulation.peak_live` counts microbatch units, which is exact for
the encoder and the generator (every unit of a part weighs the same when microbatches are equal).
An LLM rank's chunks do not: the last stage also keeps the logits and stages may differ by a
layer, so :func:`weighted_peaks` walks the ranks' op lists again with a weight per unit, making and
freeing units at the same op kinds as the simulator (:attr:`Plan.kinds`).

Transfers need buffers on the receiving rank (:func:`transport_peaks`), read off the simulated
timeline, since when a message lands depends on the op durations.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_bigmac.schedule import DataFlow, Op, Plan, Simulation

__all__ = ["transport_peaks", "weighted_peaks"]


def weighted_peaks(plan: Plan, module: str, unit_bytes: Callable[[int, Op], float]) -> tuple[float, ...]:
    """Per rank, the most bytes of ``module``'s activations alive at once, when the unit that ``op``
    makes (or frees) on ``rank`` weighs ``unit_bytes(rank, op)``.

    With every unit weighing 1 this is ``simulate(plan).peak_live[module]``. ``unit_bytes`` must give
    an op that frees a unit the weight of the op that made it (e.g. depend on rank and chunk only).
    """
    kinds = plan.kinds
    peaks = []
    for rank, ops in enumerate(plan.ranks):
        live = peak = 0.0
        for op in ops:
            if op.module != module:
                continue
            weight = unit_bytes(rank, op)
            if op.kind in kinds.opens:
                live += weight
                peak = max(peak, live)
            if op.kind in kinds.closes:
                live -= weight
        peaks.append(peak)
    return tuple(peaks)


def transport_peaks(sim: Simulation, message_bytes: Callable[[Op, Op], float]) -> tuple[float, ...]:
    """Per rank, the most bytes of received messages held at once on ``sim``'s timeline.

    ``message_bytes(producer, consumer)`` is the size of what ``producer`` sends ``consumer``. A
    message occupies its receiver from when it can land until its consumer ends: a gradient that
    answers a message the receiver sent (``B`` after its ``F``, ``EB`` after its ``EF``) from the end
    of that sending op, because the runtime posts the answer's buffer with the request
    (:mod:`lightning_bigmac.runtime.transfer`); any other message from its producer's end plus the
    transfer latency. At equal times frees come first. Send-side buffers are not counted: a sent
    tensor is the producer's output, which the sender drops once the transfer completes.
    """
    plan = sim.plan
    flow = DataFlow.of_plan(plan)
    ran = {(iv.rank, iv.op): iv for row in sim.intervals for iv in row}
    events: list[list[tuple[float, float]]] = [[] for _ in range(plan.pp)]
    for (rank, op), iv in ran.items():
        producers = flow.producers(rank, op)
        own = [ran[p].end for p in producers if p[0] == rank]
        for src in producers:
            if src[0] == rank:
                continue
            begin = own[0] if own else ran[src].end + sim.costs.latency
            size = message_bytes(src[1], op)
            events[rank] += [(begin, size), (iv.end, -size)]
    peaks = []
    for row in events:
        live = peak = 0.0
        for _, delta in sorted(row):  # frees (negative) before arrivals at the same time
            live += delta
            peak = max(peak, live)
        peaks.append(peak)
    return tuple(peaks)
