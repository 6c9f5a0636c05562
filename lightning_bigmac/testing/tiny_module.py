"""The tiny MLLM as a LightningModule that meets the BigMac model contract (for tests and docs).

It trains unchanged under ``strategy="auto"`` and ``strategy="bigmac"``: its steps call
:func:`lightning_bigmac.step_loss`. :class:`TinySteps` is a map-style dataset whose items are
whole steps (:class:`~lightning_bigmac.Microbatches`), loaded with ``batch_size=None``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from lightning_bigmac.batches import Microbatches
from lightning_bigmac.contract import step_loss
from lightning_bigmac.runtime.parts import PipelineParts

from .tiny_mllm import TinyConfig, TinyMLLM, make_microbatches

__all__ = ["TinyDataModule", "TinyMLLMModule", "TinySteps"]


class TinyMLLMModule(pl.LightningModule):
    def __init__(self, layers: int = 4, lr: float = 0.05, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyMLLM(TinyConfig(layers=layers), seed=seed)
        vocab = self.model.cfg.vocab
        self.val_acc = MulticlassAccuracy(num_classes=vocab, ignore_index=-100, average="micro")
        self.losses: list[float] = []

    def pipeline_parts(self) -> PipelineParts:
        return self.model.parts()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = step_loss(self, batch)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, outputs = step_loss(self, batch, with_outputs=True)
        for out in outputs:
            self.val_acc.update(out["preds"], out["labels"])
        self.log("val_loss", loss, prog_bar=True, batch_size=1)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class TinySteps(Dataset):
    """``steps`` deterministic steps of ``microbatches`` microbatches (varied image counts and lengths)."""

    def __init__(self, steps: int, microbatches: int, seed: int = 0, cfg: TinyConfig | None = None):
        self.steps, self.microbatches, self.seed = steps, microbatches, seed
        self.cfg = cfg or TinyConfig()

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> Microbatches:
        return Microbatches(make_microbatches(self.cfg, self.microbatches, seed=self.seed * 100_003 + i))


class _Joined(TinySteps):
    """One process's view of ``replicas`` data-parallel replicas: step i joins items
    ``replicas * i .. replicas * i + replicas - 1``, which the replicas of a distributed run see
    at step i (the runtime normalises the loss over the whole step, all replicas together)."""

    def __init__(self, steps: int, microbatches: int, replicas: int, seed: int):
        super().__init__(steps * replicas, microbatches, seed)
        self.replicas = replicas

    def __len__(self) -> int:
        return self.steps // self.replicas

    def __getitem__(self, i: int) -> Microbatches:
        items = [TinySteps.__getitem__(self, self.replicas * i + d) for d in range(self.replicas)]
        return Microbatches([mb for item in items for mb in item.microbatches])


class TinyDataModule(pl.LightningDataModule):
    """Deterministic train/val steps; replica d of a distributed run reads items d, d + D, ... in
    order, so runs with different layouts see the same data. ``join_replicas=D`` gives a single
    process the union of D replicas' steps (the reference for a D-replica run)."""

    def __init__(self, steps: int = 20, microbatches: int = 4, val_steps: int = 0, join_replicas: int = 1):
        super().__init__()
        self.steps, self.microbatches, self.val_steps = steps, microbatches, val_steps
        self.join = join_replicas

    def _loader(self, steps: int, seed: int) -> DataLoader:
        if self.join > 1:
            return DataLoader(_Joined(steps, self.microbatches, self.join, seed), batch_size=None)
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        data = TinySteps(steps * kwargs.get("num_replicas", 1), self.microbatches, seed)
        sampler = DistributedSampler(data, **kwargs, shuffle=False) if kwargs else None
        return DataLoader(data, batch_size=None, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.steps, seed=0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_steps, seed=1)
