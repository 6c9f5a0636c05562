"""A Lightning checkpoint dict under the pipeline: its tensors through DCP, the rest in ``meta.pt``.

In memory the dict is Lightning's, with two differences: ``state_dict`` holds what this rank holds,
and each entry of ``optimizer_states`` is keyed by parameter name
(:mod:`~lightning_bigmac.checkpoint.optim_by_name`). On disk (:mod:`~lightning_bigmac.checkpoint.files`)
the tensors of both are DCP entries named as :mod:`~lightning_bigmac.checkpoint.keys` says, and
everything else, every non-tensor entry Lightning, callbacks and the module put in the dict
included, is global rank 0's, in ``meta.pt`` (as Lightning's own sharded checkpoints do).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from . import files, keys

__all__ = ["read_full", "read_held", "split", "write"]

_TENSOR_ENTRIES = ("state_dict", "optimizer_states")


def split(checkpoint: dict[str, Any], state_dict_keys: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DCP entries of ``checkpoint`` (this rank's tensors) and the rest, for ``meta.pt``.

    ``state_dict_keys`` are the whole module's, in order, for consolidation.
    """
    states = checkpoint.get("optimizer_states", [])
    meta = {k: v for k, v in checkpoint.items() if k not in _TENSOR_ENTRIES}
    if "optimizer_states" in checkpoint:
        meta["optimizer_states"] = [{"param_groups": s["param_groups"]} for s in states]
    meta["bigmac"] = {"state_dict_keys": state_dict_keys}
    return keys.flatten(checkpoint["state_dict"], states), meta


def write(flat: dict[str, Any], meta: dict[str, Any] | None, path: Path, name: str) -> None:
    """Write every rank's ``flat`` entries as save ``name`` of ``path`` (a collective over the world);
    the rank given ``meta`` (global rank 0) commits it.

    DCP's planner writes each key once, on one of the ranks that hold it: replicas are not written
    by every rank.
    """
    dcp.save(flat, storage_writer=FileSystemWriter(files.staging(path, name), sync_files=True))
    if meta is not None:
        files.commit(path, name, meta)


def _assemble(meta: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    saved = meta.get("optimizer_states")
    state_dict, states = keys.unflatten(flat, len(saved or ()))
    checkpoint = {**meta, "state_dict": keys.resolve(state_dict)}
    if saved is not None:
        checkpoint["optimizer_states"] = [
            {"state": state, "param_groups": s["param_groups"]}
            for state, s in zip(states, saved, strict=True)
        ]
    return checkpoint


def read_held(
    path: Path,
    state_dict_names: Iterable[str],
    parameter_names: Sequence[Iterable[str]],
    weights_only: bool = False,
) -> dict[str, Any]:
    """This rank's view of the checkpoint at ``path``: the state-dict entries ``state_dict_names``
    and, for optimizer ``i``, the state of the parameters ``parameter_names[i]``: only what the rank
    holds is read, from whichever rank's file it is in. No collective.

    ``weights_only`` is passed on to ``torch.load`` for ``meta.pt``.
    """
    meta = files.read_meta(path, weights_only)
    names = list(state_dict_names)
    flat = files.read_tensors(
        meta["bigmac"]["tensors"], lambda available: keys.select(available, names, parameter_names)
    )
    return _assemble(meta, flat)


def read_full(path: Path, weights_only: bool = False) -> dict[str, Any]:
    """The whole checkpoint at ``path`` in this process (every entry, optimizer state by name)."""
    meta = files.read_meta(path, weights_only)
    checkpoint = _assemble(meta, files.read_tensors(meta["bigmac"]["tensors"]))
    order = meta["bigmac"]["state_dict_keys"]
    missing = [k for k in order if k not in checkpoint["state_dict"]]
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} of the module's state-dict entries, e.g. {missing[:5]}: "
            f"its tensors ({meta['bigmac']['tensors']}) are damaged; use another checkpoint"
        )
    checkpoint["state_dict"] = {k: checkpoint["state_dict"][k] for k in order}
    return checkpoint
