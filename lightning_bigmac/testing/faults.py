"""Faults that tests inject into real runs: a rank that dies in the middle of a checkpoint save."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

__all__ = ["die_in_save"]


def die_in_save(rank: int, save: int) -> None:
    """Make global rank ``rank`` of this process's run SIGKILL itself during its ``save``-th
    checkpoint save (counting from 1), right after it wrote its tensor file and before the save is
    committed, as a rank lost in the middle of a save would. Call it before ``trainer.fit``."""
    write_data = FileSystemWriter.write_data
    saves = 0

    def dying_write_data(self: FileSystemWriter, *args: Any, **kwargs: Any) -> Any:
        nonlocal saves
        written = write_data(self, *args, **kwargs)
        saves += 1
        if saves == save and dist.get_rank() == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return written

    FileSystemWriter.write_data = dying_write_data
