"""Saving in the background with ``dcp.async_save``, asked for the Lightning way: ``AsyncCheckpointIO``.

``Trainer(strategy="bigmac", plugins=[AsyncCheckpointIO()])``: a save copies this rank's tensors
to CPU memory and returns; DCP writes them in a thread, over a gloo group of its own (so its
collectives never interleave with the training's, and work under NCCL too). When global rank 0's
save completes, every rank's files are written (DCP's coordinator writes ``.metadata`` last), and
rank 0 commits it in that thread as :func:`~lightning_bigmac.checkpoint.files.commit` does for a
blocking save: until then the previous checkpoint at the path is the one that loads. A rank starts
a save only after its previous one finished, and reading a path in this process (resume,
``consolidate``, as ``RunReport`` does right after its final save) waits for its commit.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from . import files

__all__ = ["BackgroundSaves"]


class BackgroundSaves:
    """One rank's saves in the background, one at a time; ``timeout`` (seconds) bounds its collectives."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._group: dist.ProcessGroup | None = None
        self._pending: Future | None = None
        self.saving: Path | None = None
        """The path of the save in flight (or of the last one)."""

    def start(self, flat: dict[str, Any], meta: dict[str, Any] | None, path: Path, name: str) -> None:
        """Like :func:`~lightning_bigmac.checkpoint.sharded.write` (a collective), returning once the
        tensors are copied; ``meta`` (rank 0's) is copied too, for the commit."""
        self.wait()
        self.saving = path
        if self._group is None:  # collective: every rank's first background save creates it
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))
        writer = FileSystemWriter(files.staging(path, name), sync_files=True)
        written = dcp.async_save(flat, storage_writer=writer, process_group=self._group)
        if meta is None:
            self._pending = written
            return
        meta, committed = copy.deepcopy(meta), Future()

        def commit(done: Future) -> None:
            try:
                done.result()
                files.commit(path, name, meta)
                committed.set_result(None)
            except BaseException as err:  # raised by wait() or by the next read of the path
                committed.set_exception(err)

        files.expect(path, committed)
        written.add_done_callback(commit)
        self._pending = committed

    def wait(self) -> None:
        """Block until this rank's save in flight (if any) is done; raise what it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
