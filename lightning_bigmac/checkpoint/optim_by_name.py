"""Optimizer state keyed by parameter name, as ``torch.distributed.checkpoint.state_dict`` keys it.

``optimizer.state_dict()`` numbers the parameters by position, and the positions depend on which
parameters the optimizer holds: under the pipeline each rank's optimizer holds only its stages (and
the replicas). Keyed by the parameters' names in the LightningModule, the same state loads into any
layout; :func:`to_positions` turns it back into what a one-process optimizer's ``state_dict()`` is.

A by-name state is ``{"state": {name: {key: value}}, "param_groups": [{..., "params": [name, ...]}]}``
where each group's ``params`` lists the whole group in the one-process optimizer's order (what
``configure_optimizers`` returned), not only the parameters of one rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Groups", "load_into", "parameter_names", "state_of", "to_positions"]

Groups = list[list[str]]


def parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> Groups:
    """The module's name of every parameter of ``optimizer``, group by group, in the optimizer's order."""
    names = {id(p): name for name, p in module.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        strangers = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if strangers:
            raise ValueError(
                f"{type(optimizer).__name__} holds tensors of shapes {strangers[:3]} that are not parameters "
                f"of {type(module).__name__}: checkpoints key optimizer state by parameter name, so give the "
                "optimizer the module's own parameters"
            )
        groups.append([names[id(p)] for p in group["params"]])
    return groups


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def state_of(optimizer: torch.optim.Optimizer, names: Groups, full_names: Groups) -> dict[str, Any]:
    """``optimizer``'s state keyed by ``names`` (its own parameters'); the groups list ``full_names``."""
    positional = optimizer.state_dict()
    order = [name for group in names for name in group]
    return {
        "state": {order[i]: state for i, state in positional["state"].items()},
        "param_groups": [
            {**_hyper(group), "params": list(full)}
            for group, full in zip(positional["param_groups"], full_names, strict=True)
        ],
    }


def to_positions(state: Mapping[str, Any]) -> dict[str, Any]:
    """A by-name state as the one-process optimizer's ``state_dict()``: parameters numbered in order."""
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: s for name, s in state["state"].items()},
        "param_groups": [
            {**_hyper(group), "params": [index[name] for name in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def load_into(optimizer: torch.optim.Optimizer, names: Groups, state: Mapping[str, Any]) -> None:
    """Load a by-name state into ``optimizer``, whose parameters are called ``names``: each parameter
    gets its own state whatever its position, and each group the saved hyper-parameters."""
    saved_groups: Sequence[Mapping[str, Any]] = state["param_groups"]
    if len(saved_groups) != len(names):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups but this one has "
            f"{len(names)}: resume with the optimizer the checkpoint was saved with"
        )
    for g, (saved, group) in enumerate(zip(saved_groups, names, strict=True)):
        unknown = sorted(set(group) - set(saved["params"]))
        if unknown:
            raise KeyError(
                f"parameters {unknown[:3]} are in parameter group {g} here but not in the checkpoint's: "
                "resume with the optimizer (and the model) the checkpoint was saved with"
            )
    order, position = [name for group in names for name in group], itertools.count()
    optimizer.load_state_dict(
        {
            "state": {i: state["state"][name] for i, name in enumerate(order) if name in state["state"]},
            "param_groups": [
                {**_hyper(saved), "params": [next(position) for _ in group]}
                for saved, group in zip(saved_groups, names, strict=True)
            ],
        }
    )
