"""The example's data path, wired into Lightning by :class:`ExampleDataModule`::

    samples -> shards -> (webdataset | HF datasets) -> balancer -> collate -> microbatches

1. samples: :mod:`examples.mllm.sources` generates each source's records (pixels, prompt, answer);
   :mod:`examples.mllm.tokens` is the vocabulary their words come from.
2. shards: :func:`~examples.mllm.shards.build_shards` caches them once as webdataset tars
   (:mod:`examples.mllm.shards`, which also has the file layout).
3. readers: either a stream (``reader="webdataset"``, :func:`~examples.mllm.shards.read_raw` through
   :class:`balancer.BalancedStream`) or a map-style HF ``datasets.Dataset`` over the same tars
   (``reader="hf"``, :mod:`examples.mllm.hf_rows` through :class:`balancer.BalancedBatchSampler`).
4. balancer: :func:`~examples.mllm.collate.describe` gives each sample's sizes (no pixels) and the
   balancer packs samples into the microbatches of each step under a token cap.
5. collate: :func:`~examples.mllm.collate.collate_step` turns each step's records into packed
   microbatches (:mod:`examples.mllm.collate` has the tensor format).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import lightning.pytorch as pl

from balancer import BalancedBatchSampler, BalancedStream, Sample
from balancer.webdataset import webdataset_source
from lightning_bigmac import Microbatches
from lightning_bigmac.data_state import DataPosition, StepLoader

from .collate import balancer_config, collate_step, describe, metadata_with_sizes
from .config import DataConfig, ModelConfig
from .hf_rows import hf_dataset, record_from_row
from .shards import build_shards, read_raw
from .sources import Record

__all__ = ["ExampleDataModule"]


def _describe_raw(raw: dict[str, Any], cfg: ModelConfig) -> tuple[Record, Sample]:
    """``describe`` for :class:`balancer.BalancedStream`: (what the step carries, its descriptor)."""
    record = read_raw(raw)
    return record, describe(record.key, metadata_with_sizes(record), cfg)


class _Records:
    """An HF dataset seen as records: what :class:`balancer.StepDataset` fetches rows from."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Record:
        return record_from_row(self.dataset[index])

    def __getitems__(self, indices: list[int]) -> list[Record]:
        return [record_from_row(row) for row in self.dataset.__getitems__(indices)]


class ExampleDataModule(pl.LightningDataModule):
    """The example data as balanced steps of packed microbatches, split by data-parallel rank.

    Under a distributed strategy every replica plans the global step and takes its share
    (``distributed_sampler_kwargs`` gives the replica), every pipeline rank of a replica gets the
    same steps, and the pipeline size sets the balancer's group size. Pass
    ``Trainer(use_distributed_sampler=False)``: the balancer splits by replica itself.
    """

    def __init__(self, config: DataConfig | None = None, model: ModelConfig | None = None):
        super().__init__()
        self.config = config or DataConfig()
        self.model = model or ModelConfig()

    def shards(self, split: str) -> list[str]:
        """Every source's shards of ``split`` (generated on first use)."""
        cfg, model = self.config, self.model
        return [url for source in cfg.sources for url in build_shards(cfg, source, split, model)]

    def prepare_data(self) -> None:
        for split in ("train", "val"):
            self.shards(split)

    def train_dataloader(self) -> StepLoader:
        return self.loader("train")

    def val_dataloader(self) -> StepLoader:
        return self.loader("val")

    def on_after_batch_transfer(self, batch: Microbatches, dataloader_idx: int) -> Microbatches:
        """Record each training step as trained, for the data position in checkpoints (as the
        ``DataPosition`` callback does), so that a run resumes exactly whatever its callbacks."""
        if self.trainer.training:
            DataPosition.record(self.trainer, batch)
        return batch

    def loader(self, split: str) -> StepLoader:
        """A loader of this replica's steps of ``split`` (:class:`lightning_bigmac.Microbatches`).

        The training steps start at the trainer's epoch, where Lightning resumes a checkpoint written
        at an epoch's end; from one written within an epoch it restores the loader's position itself.
        """
        strategy = self.trainer.strategy if self.trainer is not None else None
        replica = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        dp_rank, dp_size = replica.get("rank", 0), replica.get("num_replicas", 1)
        pipeline_size = getattr(strategy, "pipeline_parallel_size", 1)  # BigMacStrategy's P
        balance = balancer_config(self.config, self.model, pipeline_size=pipeline_size)
        train, urls = split == "train", self.shards(split)
        collate_fn = partial(collate_step, cfg=self.model, train=train)
        if self.config.reader == "webdataset":
            steps: BalancedStream | BalancedBatchSampler = BalancedStream(
                webdataset_source(urls, seed=self.config.seed, shuffle=train),
                balance,
                describe=partial(_describe_raw, cfg=self.model),
                dp_rank=dp_rank,
                dp_size=dp_size,
            )
            dataset = None
        else:
            hf = hf_dataset(urls, os.path.join(self.config.cache_dir, "hf"))
            rows = zip(hf["__key__"], hf["json"], strict=True)  # metadata only: no pixels decoded
            descriptors = [describe(key, meta, self.model) for key, meta in rows]
            steps = BalancedBatchSampler(
                descriptors, balance, dp_rank=dp_rank, dp_size=dp_size, seed=self.config.seed, shuffle=train
            )
            dataset = _Records(hf)
        if train and self.trainer is not None:
            steps.set_epoch(self.trainer.current_epoch)
        return StepLoader(steps, dataset, collate_fn=collate_fn)
