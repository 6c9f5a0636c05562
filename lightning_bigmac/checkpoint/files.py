"""The checkpoint directory on disk, and why overwriting it never leaves it unloadable.

A checkpoint path is a directory (the layout of Lightning's own sharded checkpoints, a DCP
directory plus ``meta.pt``)::

    last.ckpt/
        meta.pt              Lightning's checkpoint dict without its tensors, and the name of ...
        tensors-<id>/        ... the DCP checkpoint of the tensors: .metadata, __<rank>_<n>.distcp

A save writes a new ``.tensors-<id>.partial/`` next to the current one (DCP fsyncs each file),
fsyncs it and renames it to ``tensors-<id>``, then replaces ``meta.pt`` by a complete, fsynced
temporary file with ``os.replace`` (the directory fsynced around both renames). POSIX cannot
replace a non-empty directory atomically, so ``meta.pt`` is the one file whose rename commits the
save: until it lands, the old ``meta.pt`` names the old tensors, which the save does not touch; a
crash at any point leaves the previous checkpoint (or, for a new path, none). Only then are the old
tensors and left-over partial directories removed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

__all__ = [
    "FORMAT",
    "META",
    "commit",
    "expect",
    "is_sharded",
    "new_tensors_name",
    "prepare",
    "read_meta",
    "read_tensors",
    "staging",
    "write_atomically",
]

META = "meta.pt"
FORMAT = 2
_TENSORS = "tensors-"


def new_tensors_name() -> str:
    """A fresh name for a save's tensor directory (chosen on rank 0 and broadcast)."""
    return f"{_TENSORS}{uuid.uuid4().hex[:12]}"


def staging(path: Path, name: str) -> Path:
    """Where a save writes its tensors before they are complete."""
    return path / f".{name}.partial"


def prepare(path: Path) -> None:
    """Make ``path`` a directory for a save (rank 0, before the others write into it)."""
    if path.is_file():
        path.unlink()  # a one-file checkpoint of another strategy is replaced by a directory
    path.mkdir(parents=True, exist_ok=True)


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory (as opposed to an ordinary one-file checkpoint)."""
    return Path(path).is_dir() and (Path(path) / META).is_file()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(obj: Any, file: Path) -> None:
    """``torch.save`` to a temporary file, fsync it, and rename it over ``file``."""
    tmp = file.with_name(f".{file.name}.partial")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    _fsync_dir(file.parent)


def commit(path: Path, name: str, meta: dict[str, Any]) -> None:
    """Make the complete tensors in :func:`staging` and ``meta`` the checkpoint at ``path`` (rank 0)."""
    staged = staging(path, name)
    _fsync_dir(staged)
    os.replace(staged, path / name)
    _fsync_dir(path)
    write_atomically({**meta, "bigmac": {**meta["bigmac"], "format": FORMAT, "tensors": name}}, path / META)
    for stale in path.iterdir():
        if stale.name != name and stale.name.lstrip(".").startswith(_TENSORS):
            shutil.rmtree(stale, ignore_errors=True)


_IN_FLIGHT: dict[Path, Future] = {}


def expect(path: Path, committed: Future) -> None:
    """Note a save of ``path`` still running in this process: reads of ``path`` wait for ``committed``."""
    _IN_FLIGHT[path.absolute()] = committed


def _settle(path: Path) -> None:
    committed = _IN_FLIGHT.pop(path.absolute(), None)
    if committed is not None:
        committed.result()


def read_meta(path: Path, weights_only: bool = False) -> dict[str, Any]:
    """``meta.pt`` of the checkpoint at ``path``, with ``bigmac.tensors`` made a full path."""
    _settle(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not (path / META).is_file():
        raise FileNotFoundError(
            f"{path} is not a BigMac checkpoint: it has no {META}. Pass the directory that "
            "trainer.save_checkpoint or ModelCheckpoint wrote (a save killed before its first commit "
            "leaves no checkpoint)"
        )
    meta = torch.load(path / META, map_location="cpu", weights_only=weights_only)
    info = meta.get("bigmac", {})
    if info.get("format") != FORMAT:
        raise ValueError(
            f"{path / META} is BigMac checkpoint format {info.get('format')}, this version reads format "
            f"{FORMAT}: consolidate it with the lightning-bigmac version that wrote it"
        )
    info["tensors"] = path / info["tensors"]
    return meta


def read_tensors(
    directory: Path, select: Callable[[Iterable[str]], list[str]] | None = None
) -> dict[str, Any]:
    """Read the keys ``select`` picks among all (default: every key) of the DCP checkpoint in
    ``directory`` into CPU memory. No collective: each process reads what it asks for, whichever
    rank wrote it."""
    metadata = FileSystemReader(directory).read_metadata().state_dict_metadata
    template: dict[str, Any] = {}
    for key in list(metadata) if select is None else select(metadata):
        md = metadata[key]
        template[key] = (
            torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
        )
    dcp.load(template, storage_reader=FileSystemReader(directory), no_dist=True)
    return template
