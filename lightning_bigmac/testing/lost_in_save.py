"""Runs in which one rank is lost in the middle of a checkpoint save, for the fault tests (via
:func:`~lightning_bigmac.testing.spawn.launch`).

Every rank runs a real ``Trainer(strategy=BigMacStrategy(...))`` fit of the tiny MLLM, one step
per epoch for two epochs, with ``ModelCheckpoint(save_last=True)``: saves 1 and 2 write
``epoch=0-step=1.ckpt`` and ``last.ckpt``, save 3 ``epoch=1-step=2.ckpt``, and in save 4, which
overwrites ``last.ckpt``, the victim strikes after writing its tensors
(:func:`~lightning_bigmac.testing.faults.strike_in_save`). The processes are started by the
launcher, not by Lightning, so no Lightning process watcher kills the survivors before they name
the lost rank themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from lightning_bigmac.strategy import BigMacStrategy

from .faults import strike_in_save
from .tiny_module import TinyDataModule, TinyMLLMModule

__all__ = ["CHECKPOINTS", "FAULTY_SAVE", "FAULT_FILE", "lose_rank_in_save"]

CHECKPOINTS = "ckpt"
"""Folder of the run's checkpoints, in the run's folder."""
FAULT_FILE = "fault"
"""File in the run's folder where the victim writes ``time.time()`` as it strikes."""
FAULTY_SAVE = 4
"""The save the victim strikes in: the second one of ``last.ckpt``."""


def lose_rank_in_save(
    rank: int, pp: int, dp: int, victim: int, how: str, timeout: float, out: str, background: bool = False
) -> None:
    """The fit described in the module docstring on global rank ``rank`` of a ``pp x dp`` layout.
    ``background``: saves through Lightning's ``AsyncCheckpointIO`` (``dcp.async_save``)."""
    world = pp * dp
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    strike_in_save(victim, FAULTY_SAVE, how, Path(out) / FAULT_FILE)
    pl.seed_everything(0, verbose=False)
    microbatches = 2 * pp
    strategy = BigMacStrategy(pipeline_parallel_size=pp, microbatches=microbatches, timeout=timeout)
    checkpoints = ModelCheckpoint(
        dirpath=Path(out) / CHECKPOINTS, every_n_epochs=1, save_top_k=-1, save_last=True
    )
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=world, max_epochs=2, logger=False,
        callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, limit_val_batches=0,
        plugins=[AsyncCheckpointIO()] if background else None,
    )  # fmt: skip
    torch.set_num_threads(1)
    trainer.fit(TinyMLLMModule(layers=pp), TinyDataModule(steps=1, microbatches=microbatches))
