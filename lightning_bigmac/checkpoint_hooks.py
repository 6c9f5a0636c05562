"""The strategy's checkpoint hooks: what Lightning calls to save and load, delegated to :mod:`.checkpoint`.

Kept apart from the lifecycle in :mod:`~lightning_bigmac.strategy` so that the file format can
change without touching it. The hooks need the strategy's process groups (``self.groups``), its
module, its optimizers and its collectives (``broadcast``, ``barrier``): every collective of a save
outside DCP's own goes through them.

Optimizer state travels keyed by parameter name (:mod:`.checkpoint.optim_by_name`): the optimizers of a
rank hold only its parameters, so positions mean nothing across layouts. The names of every
optimizer group as ``configure_optimizers`` built it (before the strategy kept only this rank's
parameters) are recorded at setup; they number the state of a consolidated checkpoint as a
one-process run numbers it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.distributed.checkpoint.api import CheckpointException

from .checkpoint import (
    files,
    gather_full_state_dict,
    load_owned_state_dict,
    optim_by_name,
    owned_state_dict,
    sharded,
)
from .checkpoint.background import BackgroundSaves
from .runtime.errors import PeerError
from .runtime.groups import PipelineGroups
from .runtime.watch import Lost

__all__ = ["CheckpointHooks"]


class CheckpointHooks:
    """Mixed into :class:`~lightning_bigmac.BigMacStrategy` before Lightning's ``ParallelStrategy``,
    whose ``broadcast``/``barrier`` and ``_watch()`` (the bounded, named waits) it uses."""

    groups: PipelineGroups | None
    world_size: int
    lightning_module: Any
    optimizers: list[torch.optim.Optimizer]
    global_rank: int
    root_device: torch.device
    checkpoint_io: Any
    timeout: float
    _background: BackgroundSaves | None
    _full_parameter_names: list[optim_by_name.Groups]
    """Per optimizer, the names of its groups' parameters as ``configure_optimizers`` returned them."""

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]
        self._full_parameter_names = [self._names(o) for o in self.optimizers]  # before restriction: all

    def _names(self, optimizer: torch.optim.Optimizer) -> optim_by_name.Groups:
        return optim_by_name.parameter_names(self.lightning_module, optimizer)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return owned_state_dict(self.lightning_module)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """This rank's optimizer state keyed by parameter name (its groups list the whole model's)."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        full = self._full_parameter_names[self.optimizers.index(optimizer)]
        return optim_by_name.state_of(optimizer, self._names(optimizer), full)

    def save_checkpoint(
        self, checkpoint_: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Write the checkpoint directory ``filepath`` (a collective); an existing checkpoint there is
        replaced only once the new one is complete (see :mod:`.checkpoint.files`). With Lightning's
        ``AsyncCheckpointIO`` plugin the files are written in the background
        (:mod:`.checkpoint.background`)."""
        if storage_options is not None:
            raise TypeError("BigMacStrategy.save_checkpoint(storage_options=...) is not supported")
        background = self._background_saves()
        if background is not None:
            self._finish_background(background)  # the previous save is complete before this one starts
        if self.global_rank == 0:
            files.prepare(Path(filepath))
        path, name = self.broadcast((str(filepath), files.new_tensors_name()))  # after rank 0 prepared
        flat, meta = sharded.split(checkpoint_, list(self.lightning_module.state_dict()))
        rank0_meta = meta if self.global_rank == 0 else None
        try:  # a peer lost inside DCP's collectives (a background save's first ones run here too)
            if background is not None:
                background.start(flat, rank0_meta, Path(path), name)
            else:
                sharded.write(flat, rank0_meta, Path(path), name)
        except (RuntimeError, CheckpointException) as err:
            raise self._lost_in_save(path, err) from err
        self.barrier("BigMacStrategy.save_checkpoint")

    def _lost_in_save(self, path: str | Path | None, err: BaseException) -> PeerError:
        """The PeerError for ``err``, raised by a save's collectives: which peer is gone or silent."""
        others = [r for r in range(self.world_size) if r != self.global_rank]
        return self._watch().failure(Lost(others, f"lost a peer while saving {path}", err))

    def _finish_background(self, background: BackgroundSaves) -> None:
        """Wait for the save in flight; a peer lost inside it is named like in a blocking save."""
        try:
            background.wait()
        except (RuntimeError, CheckpointException) as err:
            raise self._lost_in_save(background.saving, err) from err

    def _background_saves(self) -> BackgroundSaves | None:
        """Present when the Trainer has Lightning's ``AsyncCheckpointIO`` plugin."""
        if not isinstance(self.checkpoint_io, AsyncCheckpointIO):
            return None
        if getattr(self, "_background", None) is None:
            self._background = BackgroundSaves(self.timeout)
        return self._background

    def on_train_end(self) -> None:
        """Training ends with its last background save complete (its errors raised here)."""
        background = self._background_saves()
        if background is not None:
            self._finish_background(background)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """This rank's part of the checkpoint directory ``checkpoint_path``: what it holds."""
        path = Path(self.broadcast(str(checkpoint_path)))
        held = [[n for group in self._names(o) for n in group] for o in self.optimizers]
        return sharded.read_held(path, owned_state_dict(self.lightning_module), held, bool(weights_only))

    def load_model_state_dict(self, checkpoint_: Mapping[str, Any], strict: bool = True) -> None:
        source = f"checkpoint {checkpoint_['bigmac']['tensors'].parent}"
        load_owned_state_dict(self.lightning_module, checkpoint_["state_dict"], strict, source)

    def load_optimizer_state_dict(self, checkpoint_: Mapping[str, Any]) -> None:
        saved = checkpoint_["optimizer_states"]
        if len(saved) != len(self.optimizers):
            raise ValueError(
                f"the checkpoint has {len(saved)} optimizer states but configure_optimizers returns "
                f"{len(self.optimizers)} optimizers: resume with the optimizers it was saved with"
            )
        for optimizer, state in zip(self.optimizers, saved, strict=True):
            optim_by_name.load_into(optimizer, self._names(optimizer), state)
            _optimizer_to_device(optimizer, self.root_device)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every parameter of the model, gathered on global rank 0 (None elsewhere). A collective."""
        assert self.groups is not None
        return gather_full_state_dict(self.lightning_module, self.groups, self._watch(), self.root_device)
