"""Batch sampler for map-style datasets (HF ``datasets``, any ``__getitem__`` dataset).

Every replica sees the whole epoch's descriptors, so every replica plans the *global* step
(``dp_size * M`` microbatches at once) identically and takes its own share: replicas agree on
the number of steps and on ``M`` without communicating, and the packer balances them against
each other as well. The price: each replica plans every replica's samples (about 10-20 us per
sample on one CPU core), cheap next to loading them.

With a ``torch.utils.data.DataLoader`` (in Lightning, ``Trainer(use_distributed_sampler=False)``:
the sampler splits by replica itself)::

    sampler = BalancedBatchSampler(descriptors, config, dp_rank=rank, dp_size=world, seed=0)
    loader = DataLoader(
        StepDataset(dataset), batch_sampler=sampler, collate_fn=lambda step: step.map(collate)
    )

In Lightning, ``lightning_bigmac.data_state.StepLoader(sampler, dataset, collate_fn=...)`` is that
loader with the data position of the last trained step in checkpoints and epochs that move on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .config import BalancerConfig
from .samples import Sample
from .steps import Adapter, SkippedSampleWarning, StepBatch, StepPlanner

__all__ = ["BalancedBatchSampler", "StepDataset"]


class BalancedBatchSampler(Adapter[int]):
    """Yields this replica's :class:`~balancer.steps.StepBatch` of dataset indices, step by step.

    ``samples[i]`` describes dataset row ``i``. The epoch's order is a permutation drawn from
    ``(seed, epoch)`` (or row order with ``shuffle=False``), the same on every replica.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        config: BalancerConfig,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in 0..dp_size-1 (dp_size={dp_size})")
        self.samples, self.seed, self.shuffle = samples, seed, shuffle
        planner = StepPlanner(config, replicas=dp_size, describe=self._describe, where="map-style sampler")
        super().__init__(planner, share=dp_rank)
        self._lengths: dict[int, int] = {}

    def _describe(self, index: int) -> tuple[int, Sample]:
        return index, self.samples[index]

    def _elements(self, epoch: int) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(len(self.samples)))
        return iter(np.random.default_rng([self.seed, epoch]).permutation(len(self.samples)).tolist())

    def __len__(self) -> int:
        """Steps in the current epoch (planned once per epoch without loading anything)."""
        if self._epoch not in self._lengths:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SkippedSampleWarning)
                runs = self._planner.run(self._elements(self._epoch), self._epoch)
                self._lengths[self._epoch] = sum(1 for _ in runs)
        return self._lengths[self._epoch]


class StepDataset:
    """Wraps a map-style dataset so that a ``DataLoader`` fetches whole steps.

    The ``DataLoader`` hands each :class:`StepBatch` of indices from the batch sampler to
    ``__getitems__``; this returns the same step with rows in place of indices (one batched
    fetch for datasets that have ``__getitems__``, such as HF ``datasets``).
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, step: StepBatch[tuple[int, ...]]) -> StepBatch[tuple[Any, ...]]:
        flat = [i for mb in step.microbatches for i in mb]
        fetch = getattr(self.dataset, "__getitems__", None)
        rows = list(fetch(flat)) if fetch is not None else [self.dataset[i] for i in flat]
        out, k = [], 0
        for mb in step.microbatches:
            out.append(tuple(rows[k : k + len(mb)]))
            k += len(mb)
        return replace(step, microbatches=tuple(out))
