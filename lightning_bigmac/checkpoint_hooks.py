"""The strategy's checkpoint hooks: what Lightning calls to save and load, delegated to :mod:`.checkpoint`.

Kept apart from the lifecycle in :mod:`~lightning_bigmac.strategy` so that the file format can
change without touching it. The hooks need the strategy's process groups (``self.groups``), its
module and its collectives (``broadcast``, ``barrier``).
"""

from __future__ import annotations

from typing import Any

import torch

from . import checkpoint
from .runtime.groups import PipelineGroups

__all__ = ["CheckpointHooks"]


class CheckpointHooks:
    """Mixed into :class:`~lightning_bigmac.BigMacStrategy` before Lightning's ``ParallelStrategy``."""

    groups: PipelineGroups | None
    lightning_module: Any

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return checkpoint.owned_state_dict(self.lightning_module)

    def save_checkpoint(
        self, checkpoint_: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("BigMacStrategy.save_checkpoint(storage_options=...) is not supported")
        assert self.groups is not None
        path = self.broadcast(str(filepath))
        checkpoint.save_shards(checkpoint_, path, self.groups, self.lightning_module, self.barrier)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        assert self.groups is not None
        return checkpoint.load_shard(checkpoint_path, self.groups, weights_only=bool(weights_only))

    def load_model_state_dict(self, checkpoint_: dict[str, Any], strict: bool = True) -> None:
        checkpoint.load_owned_state_dict(self.lightning_module, checkpoint_["state_dict"], strict=strict)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every parameter of the model, gathered on global rank 0 (None elsewhere). A collective."""
        assert self.groups is not None
        return checkpoint.gather_full_state_dict(self.lightning_module, self.groups)
