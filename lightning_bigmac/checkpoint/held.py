"""What of the model a rank holds: its stages and the replicas (the freed pipeline parts are on meta)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_bigmac.runtime.aliases import parameter_aliases
from lightning_bigmac.runtime.collectives import gather_object
from lightning_bigmac.runtime.groups import PipelineGroups
from lightning_bigmac.runtime.watch import PeerWatch

from .keys import SameAs, resolve

__all__ = ["gather_full_state_dict", "load_owned_state_dict", "owned_state_dict"]


def owned_state_dict(module: nn.Module) -> dict[str, Any]:
    """The entries of ``module.state_dict()`` this rank holds; a held parameter's second name (tied
    embeddings) is a :class:`~.keys.SameAs` of its first, so that a checkpoint stores it once."""
    second = {name: SameAs(first) for name, first in parameter_aliases(module, held_only=True).items()}
    return {
        k: second.get(k, v)
        for k, v in module.state_dict().items()
        if not (isinstance(v, torch.Tensor) and v.is_meta)
    }


def load_owned_state_dict(
    module: nn.Module, state_dict: Mapping[str, Any], strict: bool, source: str
) -> None:
    """Load the entries this rank holds from ``state_dict``, read from ``source`` (named in errors);
    with ``strict`` every held entry must be there."""
    owned = owned_state_dict(module)
    missing = sorted(set(owned) - set(state_dict))
    if strict and missing:
        raise KeyError(
            f"{source} lacks {len(missing)} entries this rank holds, e.g. {missing[:5]}: it was saved from "
            "another model (pass strict=False, or LightningModule.strict_loading = False, to load it anyway)"
        )
    module.load_state_dict({k: v for k, v in state_dict.items() if k in owned}, strict=False)


def gather_full_state_dict(
    module: nn.Module, groups: PipelineGroups, watch: PeerWatch, device: torch.device
) -> dict[str, torch.Tensor] | None:
    """Every entry of the model's state dict on global rank 0 (None elsewhere); collective over
    the pipeline of replica 0 (the other replicas hold the same values and skip), bounded and
    named by ``watch``; ``device`` carries the bytes (the rank's GPU with NCCL)."""
    if groups.dp_rank != 0:
        return None
    mine = {
        k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
        for k, v in resolve(owned_state_dict(module)).items()
    }
    what = "the full state dict gather"
    gathered = gather_object(mine, groups.pipeline_ranks[0], groups.pipeline_group, watch, what, device)
    if gathered is None:
        return None
    full: dict[str, torch.Tensor] = {}
    for part in gathered:
        full.update(part)
    return full
