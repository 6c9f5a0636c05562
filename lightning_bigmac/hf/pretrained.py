""":class:`HFVLMModule` started from a ``save_pretrained`` directory, each rank reading only its stages.

The transformers model is built on the meta device in ``__init__`` (no memory, no initialisation)
and the parts carry :meth:`~lightning_bigmac.hf.weights.PretrainedWeights.fill` as ``fill_part``:
under ``strategy="bigmac"`` the strategy fills each part a rank owns when it places the stages;
under any other strategy (one process holds the whole model) ``configure_model`` fills all of it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lightning_bigmac.contract import PipelineStepRunner
from lightning_bigmac.runtime.parts import PipelineParts

from .module import HFVLMModule
from .weights import PretrainedWeights, meta_model

__all__ = ["PretrainedVLMModule"]


class PretrainedVLMModule(HFVLMModule):
    """An :class:`HFVLMModule` whose model and weights come from the directory ``pretrained``.

    ``pretrained``: a local directory written by ``save_pretrained`` (``config.json`` and
    safetensors, one file or sharded with ``model.safetensors.index.json``); the model class is the
    config's ``architectures[0]``. ``strict=False`` initialises tensors the files lack, as
    ``from_pretrained`` does. ``weights`` records what this process read (``weights.read``).
    """

    def __init__(
        self, pretrained: str | Path, lr: float = 1e-5, weight_decay: float = 0.0, strict: bool = True
    ) -> None:
        model = meta_model(pretrained)
        super().__init__(model, lr=lr, weight_decay=weight_decay)
        self.weights = PretrainedWeights(pretrained, model, strict=strict)
        self._filled_parts: PipelineParts | None = None

    def pipeline_parts(self) -> PipelineParts:
        if self._filled_parts is None:
            self._filled_parts = dataclasses.replace(super().pipeline_parts(), fill_part=self.weights.fill)
        return self._filled_parts

    def configure_model(self) -> None:
        """Fill the whole model in this process, unless a pipeline strategy places (and fills) the
        stages; a no-op once the model holds values (a second ``fit``, a resumed run)."""
        trainer = self._trainer
        if trainer is not None and isinstance(trainer.strategy, PipelineStepRunner):
            return
        if any(t.is_meta for t in (*self.model.parameters(), *self.model.buffers())):
            self.weights.materialise(self.model)
