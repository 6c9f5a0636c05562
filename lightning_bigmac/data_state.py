"""Exact data resume under Lightning: the balancer's position in checkpoints, and epochs that move on.

The balancer's adapters resume exactly from the ``state`` of any step (``StepBatch.state``, kept
as ``Microbatches.state`` by a collate function), but only the state of the last step *trained*
is the right one to save: ``DataLoader`` workers fetch steps ahead, and Lightning fetches one step
ahead of training from a loader without a length (a stream), so an adapter's own
``state_dict()`` runs ahead of training.

:class:`StepLoader` is a ``DataLoader`` over one adapter whose every pass starts at its
``position``: the state after the last step recorded as trained, or the next epoch's start once
Lightning has run an epoch's last step (also when ``limit_train_batches`` cut the epoch short).
Its ``state_dict`` / ``load_state_dict`` make it stateful for Lightning, whose fit loop saves the
position with the loop's own state and, when it restarts within an epoch or has ``max_steps`` set,
loads it into the loader before iterating it, before any worker starts or step is fetched.
Lightning restarts an epoch at the saved ``batch_idx`` and never skips batches itself; the loader
continues right after the saved step, so nothing is skipped twice and nothing is replayed. From a
checkpoint written at an epoch's end and resumed with ``max_epochs`` alone Lightning restores no
loader and starts the next epoch afresh: build the adapter at ``trainer.current_epoch``.

Each trained step is recorded by :class:`DataPosition`, a callback, or by
:meth:`DataPosition.record` from a data module's ``on_after_batch_transfer`` (the example's data
module does this, so its runs need no extra callback).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, IterableDataset

from balancer import BalancedBatchSampler, BalancedStream, StepDataset
from balancer.steps import epoch_done, make_state

__all__ = ["DataPosition", "StepLoader"]


class _StreamSteps(IterableDataset):
    """A balanced stream as an ``IterableDataset`` of steps (loaded with ``batch_size=None``)."""

    def __init__(self, stream: BalancedStream):
        self.stream = stream

    def __iter__(self) -> Iterator[Any]:
        return iter(self.stream)


class StepLoader(DataLoader):
    """A ``DataLoader`` of a balancer's steps whose every pass starts after the last step trained.

    ``steps`` is a :class:`~balancer.BalancedBatchSampler` with the ``dataset`` its indices address
    (rows are fetched a whole step at a time through :class:`~balancer.StepDataset`), or a
    :class:`~balancer.BalancedStream` without one. Other keywords go to ``DataLoader``:
    ``collate_fn`` receives whole steps (``lambda step: step.map(collate)``), ``num_workers`` is
    at most 1 for a stream, which refuses persistent workers.
    """

    def __init__(self, steps: BalancedBatchSampler | BalancedStream, dataset: Any = None, **kwargs: Any):
        if isinstance(steps, BalancedBatchSampler):
            if dataset is None:
                raise TypeError(
                    "StepLoader(BalancedBatchSampler, dataset): pass the dataset its indices address"
                )
            super().__init__(StepDataset(dataset), batch_sampler=steps, **kwargs)
        elif isinstance(steps, BalancedStream):
            if dataset is not None:
                raise TypeError("StepLoader(BalancedStream) takes no dataset: the stream yields the items")
            if kwargs.get("persistent_workers"):
                raise ValueError(
                    "StepLoader(BalancedStream) needs persistent_workers=False: a persistent worker keeps "
                    "its own copy of the stream, which would not start each pass at the loader's position"
                )
            super().__init__(_StreamSteps(steps), batch_size=None, **kwargs)
        else:
            raise TypeError(f"StepLoader needs a BalancedBatchSampler or a BalancedStream, got {type(steps)}")
        self.steps = steps
        self.position: dict[str, Any] | None = None
        """The adapter state passes start from, once a step is recorded or a state loaded; until
        then passes run as the adapter does by itself (a validation loader stays so)."""
        self._iterated, self._recorded = False, False

    def __iter__(self) -> Iterator[Any]:
        """A pass from :attr:`position`, before any worker starts or step is fetched."""
        if self.position is not None:
            self.steps.load_state_dict(self.position)
        self._iterated = True
        return super().__iter__()

    def trained(self, batch: Any, epoch_steps: float = math.inf) -> None:
        """Record that ``batch`` (a ``StepBatch``, or ``Microbatches`` with ``state``) is trained.

        After the adapter's last step of an epoch, or after ``epoch_steps`` steps (the training
        loop's steps per epoch, Lightning's ``trainer.num_training_batches``, which
        ``limit_train_batches`` lowers), the position is the next epoch's start.
        """
        state: Mapping[str, Any] | None = getattr(batch, "state", None)
        if state is None:
            raise ValueError(
                f"a {type(batch).__name__} batch carries no balancer state: collate each step into a "
                "StepBatch (step.map(collate)) or a Microbatches(..., state=dict(step.state))"
            )
        if epoch_done(state) or state["step"] >= epoch_steps:
            state = make_state(state["epoch"] + 1, 0, 0)
        self.position, self._recorded = dict(state), True

    def state_dict(self) -> dict[str, Any]:
        """The position: Lightning's fit loop saves it in checkpoints."""
        if self._iterated and not self._recorded:
            warnings.warn(
                "StepLoader: no trained step was recorded, so this checkpoint holds where the adapter "
                "stands, ahead of training: add lightning_bigmac.data_state.DataPosition() to the "
                "Trainer's callbacks",
                stacklevel=2,
            )
        return dict(self.position) if self.position is not None else self.steps.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Start the next pass after the step ``state`` was saved at (Lightning calls this on resume)."""
        self.position = dict(state)


class DataPosition(pl.Callback):
    """Records each training step in the trainer's :class:`StepLoader` as the step starts.

    Recording when the step starts, not when it ends, keeps every checkpoint written after the
    step right, whatever the order of the callbacks that write them.
    """

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.record(trainer, batch)

    @staticmethod
    def record(trainer: pl.Trainer, batch: Any) -> None:
        """Record training ``batch`` as trained in the trainer's training :class:`StepLoader`."""
        loader = trainer.train_dataloader
        if not isinstance(loader, StepLoader):
            raise TypeError(
                "DataPosition records steps in a lightning_bigmac.data_state.StepLoader, but the training "
                f"dataloader is a {type(loader).__name__}: build it as StepLoader(sampler, dataset) or "
                "StepLoader(stream)"
            )
        loader.trained(batch, epoch_steps=trainer.num_training_batches)
