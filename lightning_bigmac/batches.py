"""The data of one step: a batch, its microbatches, and which rank owns each microbatch's encoder work.

Both sides of the model contract read this module: :func:`~lightning_bigmac.contract.step_loss`
(one process) and the strategy (the pipeline). A batch is either an object with a
``microbatches`` list (and optionally an ``owners`` list, as the balancer produces) or any
pytree of tensors, which is split along dim 0 into the strategy's number of microbatches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["Microbatches", "microbatches_of", "split_batch"]


@dataclass
class Microbatches:
    """A batch already cut into one step's microbatches, with an optional owner map (one rank per
    microbatch, a permutation of the pipeline ranks within each group). The balancer's output has
    the same two attributes; any object with a ``microbatches`` list is taken as pre-split."""

    microbatches: list[Any]
    owners: list[int] | None = None
    state: dict[str, Any] | None = None
    """The data adapter's state right after this step (the balancer's ``StepBatch.state``), kept
    so that a checkpoint can resume the data exactly; the strategy does not read it."""


def microbatches_of(batch: Any) -> list[Any]:
    """The microbatches of a pre-split batch, or ``[batch]``: one process computes the loss of the
    whole batch at once (the loss is a sum over targets, so splitting would not change it)."""
    return list(batch.microbatches) if hasattr(batch, "microbatches") else [batch]


def split_batch(batch: Any, microbatches: int) -> tuple[list[Any], list[int] | None]:
    """The step's microbatches and owner map (None: the default ``j mod pp``).

    A batch with a ``microbatches`` attribute is already split (by the balancer); any other batch
    is a pytree of tensors cut along dim 0 into ``microbatches`` pieces of near-equal size.
    """
    if hasattr(batch, "microbatches"):
        owners = getattr(batch, "owners", None)
        return list(batch.microbatches), (list(owners) if owners is not None else None)
    leaves = [x for x in pytree.tree_leaves(batch) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise TypeError(f"cannot split a batch of type {type(batch).__name__}: it holds no tensors")
    size = leaves[0].shape[0] if leaves[0].dim() else 0
    if any(x.dim() == 0 or x.shape[0] != size for x in leaves):
        raise ValueError(
            "cannot split the batch into microbatches: its tensors differ in dim 0 "
            f"({sorted({x.shape[0] if x.dim() else 0 for x in leaves})}); give a batch whose tensors share "
            "the batch dimension, or an object with a `microbatches` list"
        )
    if size < microbatches:
        raise ValueError(
            f"a batch of {size} samples cannot make microbatches={microbatches}: raise the batch size "
            "or lower the strategy's `microbatches`"
        )
    bounds = [size * i // microbatches for i in range(microbatches + 1)]

    def piece(i: int) -> Any:
        return pytree.tree_map(
            lambda x: x[bounds[i] : bounds[i + 1]] if isinstance(x, torch.Tensor) else x, batch
        )

    return [piece(i) for i in range(microbatches)], None
