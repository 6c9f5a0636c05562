"""Faults that tests inject into real runs: a rank lost in the middle of a checkpoint save."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

__all__ = ["SIGNALS", "strike_in_save"]

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
"""How a rank is lost: killed (its connections close) or stopped (it holds them open, silent)."""


def strike_in_save(rank: int, save: int, how: str = "kill", fault_file: Path | None = None) -> None:
    """Make global rank ``rank`` of this process's run kill or stop itself (``how``, see
    :data:`SIGNALS`) during its ``save``-th checkpoint save (counting from 1), right after it wrote
    its tensor file and before the save is committed, as a rank lost in the middle of a save would.
    ``fault_file``: where it writes ``time.time()`` as it strikes. Call it before ``trainer.fit``.

    Blocking and background saves both write through ``FileSystemWriter.write_data``.
    """
    if how not in SIGNALS:
        raise ValueError(f"how={how!r}: choose one of {sorted(SIGNALS)}")
    write_data = FileSystemWriter.write_data
    saves = 0

    def striking_write_data(self: FileSystemWriter, *args: Any, **kwargs: Any) -> Any:
        nonlocal saves
        written = write_data(self, *args, **kwargs)
        saves += 1
        if saves == save and dist.get_rank() == rank:
            if fault_file is not None:
                fault_file.write_text(repr(time.time()))
            os.kill(os.getpid(), SIGNALS[how])
        return written

    FileSystemWriter.write_data = striking_write_data
