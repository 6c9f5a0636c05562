"""Activation accounting: bytes saved for backward, per module, per rank, and the step's peak.

Around each op's forward a ``saved_tensors_hooks`` pair sees every tensor autograd saves. The
bytes of their storages (each storage counted once per op; parameters excluded, they are not
activations) form the op's *unit*, the same unit the simulator counts in
(:attr:`~lightning_bigmac.schedule.Simulation.peak_live`): ``F`` and ``EF`` make a unit live,
``B`` and ``EB`` free it once the executor drops the saved graph, ``G`` makes and frees one; in a
split backward ``W`` frees the ``F`` unit and ``GI`` makes a unit that ``GW`` frees (the
input-gradient ops keep the graph for them). Which kinds keep and free a unit is the plan's
(:class:`~lightning_bigmac.schedule.plan.StepKinds`): the forward of a frozen encoder keeps
nothing, so its unit is live during the op only, and whatever it saved (nothing, run without
autograd) shows in the peak. The peak of the live sum is what the simulator predicts in units,
so for equal-sized microbatches ``peak_bytes / unit_bytes`` must equal the predicted peak.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from lightning_bigmac.schedule import Op
from lightning_bigmac.schedule.plan import EB, EF, GI, GW, MODULES, B, F, G, I, StepKinds, W

__all__ = ["ActivationMeter"]

_FORWARDS = {F, EF, G, GI}
_FORWARD_OF = {B: F, I: F, W: F, EB: EF, GW: GI}


def _unit(op: Op) -> tuple[str, int, int]:
    kind = _FORWARD_OF.get(op.kind, op.kind)
    return (kind, op.microbatch, op.chunk)


class ActivationMeter:
    """Counts saved-for-backward bytes per op and tracks live and peak bytes per module.

    ``params``: tensors never to count (the model's parameters, whose storages autograd saves
    for weight gradients of matmuls but which are not activations).
    """

    def __init__(self, params: Iterable[torch.Tensor] = ()):
        self._ignore = {p.untyped_storage().data_ptr() for p in params if not p.is_meta}
        self.reset()

    def reset(self) -> None:
        """Start a step: nothing live, peaks zero, no units recorded."""
        self.live = dict.fromkeys(MODULES, 0)
        self.peak = dict.fromkeys(MODULES, 0)
        self.unit_bytes: dict[tuple[str, int, int], int] = {}
        """Bytes of every unit recorded this step, by ``(forward kind, microbatch, chunk)``."""

    @contextmanager
    def record(self, op: Op, kinds: StepKinds) -> Iterator[None]:
        """Count what ``op`` of a step of ``kinds`` saves for backward (a no-op context for ops
        that free)."""
        if op.kind not in _FORWARDS:
            yield
            if op.kind in kinds.closes:
                self._close(op)
            return
        seen: set[int] = set()
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in seen and ptr not in self._ignore:
                seen.add(ptr)
                total += storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        module = op.module
        self.unit_bytes[_unit(op)] = total
        self.live[module] += total
        self.peak[module] = max(self.peak[module], self.live[module])
        if op.kind in kinds.closes or op.kind not in kinds.opens:  # a unit no later op frees
            self._close(op)

    def _close(self, op: Op) -> None:
        self.live[op.module] -= self.unit_bytes.get(_unit(op), 0)

    def report(self) -> dict[str, int]:
        """Peak bytes per module this step."""
        return dict(self.peak)
