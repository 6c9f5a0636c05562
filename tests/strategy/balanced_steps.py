"""Tiny balancer data for the data-position tests: 80 text samples packed into tiny-model steps.

Imported by ``test_data_position.py`` and by the two-process script ``run_balanced.py``.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable

import lightning.pytorch as pl

from balancer import BalancedBatchSampler, BalancerConfig, Sample, StepBatch
from lightning_bigmac.data_state import StepLoader
from lightning_bigmac.testing.tiny_mllm import TinyConfig, make_microbatches

CONFIG = BalancerConfig(pipeline_size=2, microbatches=4, token_cap=40)
N = 80
TOKENS = [3 + (7 * i) % 10 for i in range(N)]
KEYS = [f"k{i:03d}" for i in range(N)]


def samples() -> list[Sample]:
    return [Sample(key=k, text_tokens=t) for k, t in zip(KEYS, TOKENS, strict=True)]


def tiny_step(step: StepBatch) -> StepBatch:
    """A balancer step -> the same step of tiny-model microbatches (one text sequence per microbatch)."""

    def packed(mb: tuple[Sample, ...]) -> dict:
        seed = zlib.crc32(" ".join(s.key for s in mb).encode())
        return make_microbatches(TinyConfig(), 1, seed=seed, sizes=[(0, sum(s.text_tokens for s in mb))])[0]

    return dataclasses.replace(step, microbatches=tuple(packed(mb) for mb in step.samples))


def rows(dp_rank: int, dp_size: int) -> StepLoader:
    """A loader of this replica's steps over a list of rows."""
    sampler = BalancedBatchSampler(samples(), CONFIG, dp_rank=dp_rank, dp_size=dp_size)
    table = [{"key": k, "tokens": t} for k, t in zip(KEYS, TOKENS, strict=True)]
    return StepLoader(sampler, table, collate_fn=tiny_step)


class Keys(pl.Callback):
    """(epoch, step, keys) of every step training_step receives."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((batch.epoch, batch.step, batch.keys))


class Steps(pl.LightningDataModule):
    """The recipe: build the adapter for this replica at the trainer's epoch (where a fit that
    restores no data position starts), as a :class:`StepLoader`."""

    def __init__(self, make_loader: Callable[[int, int], StepLoader]):
        super().__init__()
        self.make_loader = make_loader

    def train_dataloader(self) -> StepLoader:
        replica = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        loader = self.make_loader(replica.get("rank", 0), replica.get("num_replicas", 1))
        loader.steps.set_epoch(self.trainer.current_epoch)
        return loader
