"""What a forward keeps, and the backward that consumes it: whole, or split in two halves.

A stage's backward starts from its outputs that received gradients (and, on the last stage, its
scaled text loss: :meth:`Kept.roots`). Most schedules run it whole (:func:`full_backward`, then
:func:`leaf_grads` for what goes upstream). Zero-bubble schedules run the gradients a peer waits
for now (``I``, ``GI``: :func:`backward_input`) and the weight gradients whenever the rank has
nothing better to do (``W``, ``GW``: :func:`backward_weight`). Both halves together must do the
work of one backward, no more, and give the same gradients to the last bit.

:func:`backward_input` walks the op's autograd graph once. Nodes from which an input is reachable
form the *input closure*; the input half runs exactly those (``torch.autograd.grad`` on the
inputs, which skips every weight-gradient edge). Walking up from each parameter's accumulator, the
first closure nodes met are where the two halves meet: the input half also asks autograd for the
gradient arriving at each of them (``GradientEdge`` inputs, captured inside the engine, so no
Python runs per node). :func:`backward_weight` later starts autograd from those nodes with those
gradients (``GradientEdge`` roots) and asks only for the parameters, so each such node now
computes just its weight-gradient edges. Outputs that do not depend on the
inputs (or a stage without inputs that need gradients) start the weight half themselves.

Parameters are grouped by the meeting nodes they share; each group is one autograd call, so that a
meeting node's gradient is never pushed on into another group's meeting node. If one meeting node
of a group reaches another through the closure (a weight used twice in a chain), splitting would
count that path twice: such a group's weight half runs from the outputs instead, on the graph the
input half kept, which is exact and redoes part of the input half. This is the graph split of
``torch.distributed.pipelining``'s ``stage_backward_input``/``stage_backward_weight``, with groups
checked for that case and outputs that bypass the inputs handled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["Kept", "WeightBackward", "backward_input", "backward_weight", "full_backward", "leaf_grads"]


@dataclass
class Kept:
    """What a stage's forward keeps for its backward."""

    inputs: list[torch.Tensor | None]
    """Leaves of the received input; their gradients go upstream."""
    outputs: list[Any]
    """Leaves of the output whose gradients come from downstream."""
    loss: torch.Tensor | None = None
    """The scaled text loss on the last stage."""

    def roots(self, grads: list[torch.Tensor | None] | None) -> tuple[list[Any], list[torch.Tensor | None]]:
        """Where the backward starts: the loss (gradient one) and the outputs with their received
        gradients (``grads`` None: the last stage without a generator)."""
        tensors: list[Any] = [] if self.loss is None else [self.loss]
        upstream: list[torch.Tensor | None] = [] if self.loss is None else [torch.ones_like(self.loss)]
        if grads is not None:
            tensors += self.outputs
            upstream += grads
        return tensors, upstream


def leaf_grads(inputs: Sequence[Any]) -> list[torch.Tensor | None]:
    """The accumulated ``.grad`` of each input leaf that requires grad (None elsewhere)."""
    return [x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs]


def full_backward(tensors: Sequence[Any], grads: Sequence[torch.Tensor | None]) -> None:
    """Backward from the outputs that require grad and received one (a stage may ignore an input)."""
    pairs = _pairs(tensors, grads)
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _pairs(tensors: Sequence[Any], grads: Sequence[torch.Tensor | None]) -> list[tuple[torch.Tensor, Any]]:
    return [
        (t, g)
        for t, g in zip(tensors, grads, strict=True)
        if isinstance(t, torch.Tensor) and t.requires_grad and g is not None
    ]


@dataclass
class WeightBackward:
    """The weight half of a split backward, holding the graph (and its activations) until it runs."""

    calls: list[tuple[list[torch.Tensor | GradientEdge], list[torch.Tensor], list[torch.Tensor]]] = field(
        default_factory=list
    )
    """Per parameter group: autograd roots, their gradients, the parameters."""


def _node(t: torch.Tensor) -> Node:
    return get_gradient_edge(t).node


def _graph(roots: Sequence[torch.Tensor]) -> tuple[dict[Node, list[Node]], dict[Node, set[int]]]:
    """Every node of the graph under ``roots``, mapped to the nodes whose gradients flow into it,
    and to its input slots that receive a gradient."""
    edges = [get_gradient_edge(t) for t in roots]
    parents: dict[Node, list[Node]] = {e.node: [] for e in edges}
    slots: dict[Node, set[int]] = {n: set() for n in parents}
    for e in edges:
        slots[e.node].add(e.output_nr)
    queue = deque(parents)
    while queue:
        node = queue.popleft()
        for nxt, slot in node.next_functions:
            if nxt is None:
                continue
            if nxt not in parents:
                parents[nxt], slots[nxt] = [], set()
                queue.append(nxt)
            parents[nxt].append(node)
            slots[nxt].add(slot)
    return parents, slots


def _upward(
    start: Sequence[Node], parents: dict[Node, list[Node]], stop: set[Node]
) -> tuple[set[Node], set[Node]]:
    """Nodes reached from ``start`` towards the outputs without entering ``stop``; and the ``stop``
    nodes met on the way."""
    seen, met = set(start), set()
    queue = deque(start)
    while queue:
        for parent in parents[queue.popleft()]:
            if parent in stop:
                met.add(parent)
            elif parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return seen, met


def _reaches_another(meeting: set[Node], closure: set[Node]) -> bool:
    """Whether a gradient leaving one meeting node reaches another through the closure."""
    if len(meeting) < 2:
        return False
    for start in meeting:
        seen, queue = {start}, deque([start])
        while queue:
            for nxt, _ in queue.popleft().next_functions:
                if nxt is None or nxt not in closure or nxt in seen:
                    continue
                if nxt in meeting:
                    return True
                seen.add(nxt)
                queue.append(nxt)
    return False


def backward_input(
    outputs: Sequence[Any], grads: Sequence[torch.Tensor | None], inputs: Sequence[Any]
) -> tuple[list[torch.Tensor | None], WeightBackward]:
    """Gradients of ``inputs`` (None where an input is not a tensor that requires grad) from
    ``outputs`` receiving ``grads``; and the weight half, for :func:`backward_weight`.

    Outputs that are not tensors requiring grad, or whose gradient is None, are left out, as a
    stage may ignore part of what it receives.
    """
    pairs = _pairs(outputs, grads)
    wanted = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    result: list[torch.Tensor | None] = [None] * len(inputs)
    if not pairs:
        return result, WeightBackward()
    parents, slots = _graph([t for t, _ in pairs])
    roots = {_node(t) for t, _ in pairs}
    input_nodes = [_node(inputs[i]) for i in wanted]
    closure, _ = _upward([n for n in input_nodes if n in parents], parents, set())
    params = [
        n for n in parents if n not in closure and isinstance(getattr(n, "variable", None), torch.Tensor)
    ]
    groups = _groups(params, parents, closure, roots)
    meeting = [GradientEdge(n, s) for m, _, _, exact in groups if exact for n in m for s in sorted(slots[n])]
    captured: dict[tuple[Node, int], torch.Tensor | None] = {}
    if closure:
        got = torch.autograd.grad(
            [t for t, _ in pairs], [inputs[i] for i in wanted] + meeting, [g for _, g in pairs],
            retain_graph=True, allow_unused=True,
        )  # fmt: skip
        for i, g in zip(wanted, got[: len(wanted)], strict=True):
            result[i] = g
        captured = {(e.node, e.output_nr): g for e, g in zip(meeting, got[len(wanted) :], strict=True)}
    return result, WeightBackward([_call(group, pairs, captured) for group in groups])


def _groups(
    params: list[Node], parents: dict[Node, list[Node]], closure: set[Node], roots: set[Node]
) -> list[tuple[set[Node], set[Node], list[Node], bool]]:
    """Parameters grouped by the nodes their weight half starts from (meeting nodes, and output
    nodes they hang from without passing the closure); per group those two sets, the accumulators
    and whether the split is exact."""
    group_of: dict[Node, int] = {}  # start node -> index of the group that owns it
    groups: list[tuple[set[Node], set[Node], list[Node]]] = []
    for param in params:
        seen, meeting = _upward([param], parents, closure)
        group = (meeting, seen & roots, [param])
        for index in sorted({group_of[n] for n in group[0] | group[1] if n in group_of}):
            old, groups[index] = groups[index], (set(), set(), [])
            group = (group[0] | old[0], group[1] | old[1], old[2] + group[2])
        groups.append(group)
        group_of.update(dict.fromkeys(group[0] | group[1], len(groups) - 1))
    return [(m, r, p, not _reaches_another(m, closure)) for m, r, p in groups if p]


def _call(
    group: tuple[set[Node], set[Node], list[Node], bool],
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    captured: dict[tuple[Node, int], torch.Tensor | None],
) -> tuple[list[torch.Tensor | GradientEdge], list[torch.Tensor], list[torch.Tensor]]:
    meeting, root_nodes, accumulators, exact = group
    params = [n.variable for n in accumulators]
    if not exact:
        return [t for t, _ in pairs], [g for _, g in pairs], params
    starts: list[torch.Tensor | GradientEdge] = []
    grads: list[torch.Tensor] = []
    for (node, slot), g in captured.items():
        if node in meeting and g is not None:
            starts.append(GradientEdge(node, slot))
            grads.append(g)
    for t, g in pairs:
        if _node(t) in root_nodes:
            starts.append(t)
            grads.append(g)
    return starts, grads, params


def backward_weight(pending: WeightBackward) -> None:
    """Accumulate the weight gradients into ``.grad``; the graph is freed when ``pending`` goes."""
    for starts, grads, params in pending.calls:
        if starts:
            torch.autograd.backward(starts, grads, inputs=params, retain_graph=True)
    pending.calls.clear()
