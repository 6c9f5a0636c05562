"""A LightningModule around a transformers VLM: it meets the BigMac model contract with no user glue."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from transformers import PretrainedConfig

from lightning_bigmac.contract import step_loss
from lightning_bigmac.runtime.parts import PipelineParts

from .models import hf_pipeline_parts, model_from_config

__all__ = ["HFVLMModule"]


class HFVLMModule(pl.LightningModule):
    """Trains a supported transformers VLM (see :data:`~lightning_bigmac.hf.SUPPORTED_MODELS`) under
    ``strategy="bigmac"`` or any Lightning strategy.

    ``model``: the transformers model, or its config for a randomly initialised one. It stays
    attribute ``model``, so parameter and checkpoint names are ``model.<HF name>``, and after
    training ``module.model`` is an ordinary HF model (``generate``, ``save_pretrained``). A batch
    is a dict of tensors as the model's HF processor returns it, collated, with ``labels`` (-100:
    no target), or a :class:`~lightning_bigmac.Microbatches` of such dicts. The optimizer is AdamW
    with ``lr`` and ``weight_decay`` (0 by default, as in HF's ``TrainingArguments``).
    """

    def __init__(self, model: nn.Module | PretrainedConfig, lr: float = 1e-5, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if isinstance(model, PretrainedConfig):  # export_pretrained finds the config in the checkpoint
            self.hparams["config"] = model
        self.model = model_from_config(model) if isinstance(model, PretrainedConfig) else model
        # The parts wrap the model's submodules; kept out of nn.Module registration (a plain
        # attribute) so that state_dict keys stay the HF names. Building them also rejects an
        # unsupported class here rather than at the first step.
        self._parts = hf_pipeline_parts(self.model)

    def pipeline_parts(self) -> PipelineParts:
        return self._parts

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = step_loss(self, batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", step_loss(self, batch), prog_bar=True, batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
