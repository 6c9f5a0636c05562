"""Sharded checkpoints: one file per rank, written atomically, and their consolidation.

A checkpoint is a directory::

    epoch=0-step=5.ckpt/
        shard-00000.pt ... shard-<world-1>.pt   each rank's parameters and optimizer state
        meta.pt                                 rank 0: loops, callbacks, schedulers, hyper-parameters,
                                                and the layout it was saved with

``meta.pt`` is written last, after every shard is on disk, and removed first when a checkpoint
is overwritten, so a directory with a ``meta.pt`` is always complete. Every file goes through a
temporary name and ``os.replace``. :func:`consolidate` merges the shards of one data-parallel
replica into an ordinary Lightning checkpoint that ``MyModule.load_from_checkpoint`` reads in one
process, without the strategy (``bigmac consolidate DIR OUT.ckpt``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .runtime.groups import PipelineGroups

__all__ = [
    "consolidate",
    "gather_full_state_dict",
    "load_owned_state_dict",
    "load_shard",
    "owned_state_dict",
    "save_shards",
]

META = "meta.pt"
FORMAT = 1


def _shard(rank: int) -> str:
    return f"shard-{rank:05d}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def owned_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``module.state_dict()`` this rank holds (freed pipeline parts are on meta)."""
    return {k: v for k, v in module.state_dict().items() if not v.is_meta}


def save_shards(
    checkpoint: dict[str, Any],
    path: str | Path,
    groups: PipelineGroups,
    module: nn.Module,
    barrier: Callable[[], None],
) -> None:
    """Write this rank's shard of a Lightning checkpoint dict (a collective over the world)."""
    path = Path(path)
    if groups.rank == 0:
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        (path / META).unlink(missing_ok=True)  # the directory is incomplete until meta.pt is back
    barrier()
    step = checkpoint.get("global_step")
    shard = {
        "global_step": step,
        "state_dict": checkpoint.pop("state_dict"),
        "optimizer_states": checkpoint.pop("optimizer_states", []),
    }
    _atomic_save(shard, path / _shard(groups.rank))
    barrier()
    if groups.rank == 0:
        checkpoint["bigmac"] = {
            "format": FORMAT,
            "pp": groups.pp,
            "dp": groups.dp,
            "state_dict_keys": list(module.state_dict().keys()),
        }
        _atomic_save(checkpoint, path / META)
    barrier()


def _read_meta(path: Path, weights_only: bool = False) -> dict[str, Any]:
    if not (path / META).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete BigMac checkpoint (no {META}): it was not written by BigMacStrategy, "
            "or saving it was interrupted"
        )
    meta = torch.load(path / META, map_location="cpu", weights_only=weights_only)
    if meta.get("bigmac", {}).get("format") != FORMAT:
        raise ValueError(f"{path / META} has an unknown BigMac checkpoint format")
    return meta


def _read_shard(path: Path, rank: int, meta: dict[str, Any], weights_only: bool = False) -> dict[str, Any]:
    file = path / _shard(rank)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the checkpoint needs one shard per rank")
    shard = torch.load(file, map_location="cpu", weights_only=weights_only)
    if shard["global_step"] != meta.get("global_step"):
        raise ValueError(
            f"{file} is from step {shard['global_step']} but {META} from step {meta.get('global_step')}: "
            "the checkpoint directory mixes two saves"
        )
    return shard


def load_shard(path: str | Path, groups: PipelineGroups, weights_only: bool = False) -> dict[str, Any]:
    """This rank's view of a sharded checkpoint, as the Lightning checkpoint dict it was saved from.

    ``weights_only`` is passed on to ``torch.load`` (Lightning asks for it on untrusted files).
    """
    path = Path(path)
    meta = _read_meta(path, weights_only)
    saved = meta["bigmac"]
    if (saved["pp"], saved["dp"]) != (groups.pp, groups.dp):
        raise ValueError(
            f"{path} was saved with pipeline_parallel_size={saved['pp']} x {saved['dp']} replicas but this "
            "run "
            f"has {groups.pp} x {groups.dp}: consolidate it (`bigmac consolidate {path} full.ckpt`) and load "
            "the full weights instead"
        )
    shard = _read_shard(path, groups.rank, meta, weights_only)
    return {**meta, "state_dict": shard["state_dict"], "optimizer_states": shard["optimizer_states"]}


def load_owned_state_dict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Load a shard into the parts this rank holds; with ``strict`` every held entry must be there."""
    owned = set(owned_state_dict(module))
    missing, unexpected = sorted(owned - set(state_dict)), sorted(set(state_dict) - owned)
    if strict and (missing or unexpected):
        raise KeyError(
            f"checkpoint shard does not match this rank's parameters: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (was it saved with another split of the model?)"
        )
    module.load_state_dict(state_dict, strict=False)


def consolidate(path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Merge a sharded checkpoint into one ordinary Lightning checkpoint (weights, no optimizer state).

    Reads the shards of data-parallel replica 0 (global ranks ``0 .. pp-1``); every key of the
    module's state dict must come from exactly one of them, encoder and generator replicas aside.
    """
    path = Path(path)
    meta = _read_meta(path)
    saved = meta.pop("bigmac")
    merged: dict[str, torch.Tensor] = {}
    for rank in range(saved["pp"]):
        merged.update(_read_shard(path, rank, meta)["state_dict"])
    missing = [k for k in saved["state_dict_keys"] if k not in merged]
    if missing:
        raise ValueError(f"the shards of {path} lack {len(missing)} entries, e.g. {missing[:5]}")
    for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
        meta.pop(key, None)
    full = {**meta, "state_dict": {k: merged[k] for k in saved["state_dict_keys"]}}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(full, Path(out))
    return full


def gather_full_state_dict(module: nn.Module, groups: PipelineGroups) -> dict[str, torch.Tensor] | None:
    """Every entry of the model's state dict on global rank 0 (None elsewhere); collective over
    the pipeline of replica 0 (the other replicas hold the same values and skip)."""
    if groups.dp_rank != 0:
        return None
    mine = {k: v.detach().cpu() for k, v in owned_state_dict(module).items()}
    gathered: list[Any] | None = [None] * groups.pp if groups.rank == 0 else None
    dist.gather_object(mine, gathered, dst=groups.pipeline_ranks[0], group=groups.pipeline_group)
    if gathered is None:
        return None
    full: dict[str, torch.Tensor] = {}
    for part in gathered:
        full.update(part)
    return full
