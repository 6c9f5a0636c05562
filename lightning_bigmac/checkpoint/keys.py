"""The names of a checkpoint's tensors in DCP: the LightningModule's own names, never a rank or a position.

============================================  ===================================================
``state_dict.<name>``                         entry ``<name>`` of ``LightningModule.state_dict()``
``optimizer_states.<i>.state.<name>.<key>``   optimizer ``i``'s state ``<key>`` (``exp_avg``,
                                              ``step``, ...) of the parameter called ``<name>``
============================================  ===================================================

The names do not depend on the layout, so a rank of any layout finds what it holds, and an entry
held by several ranks (encoder and generator replicas, data-parallel copies of a stage) is one key,
which DCP's planner writes once. Optimizer state keys (``exp_avg``) never contain a dot, so the
parameter name is everything between the prefix and the last dot.

A parameter the module holds under several names (tied embeddings: ``lm_head.weight is
embed_tokens.weight``) is stored under its first name; each other name's entry is a
:class:`SameAs` naming it, which :func:`resolve` turns back into the tensor. The optimizer state
is keyed by the first name already (``named_parameters`` lists a parameter once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["STATE_DICT", "SameAs", "flatten", "optimizer_prefix", "resolve", "select", "unflatten"]

STATE_DICT = "state_dict."


@dataclass(frozen=True)
class SameAs:
    """The state-dict entry of a second name of the parameter stored under ``name``."""

    name: str


def resolve(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each :class:`SameAs` entry replaced by the entry it names."""
    return {k: state_dict[v.name] if isinstance(v, SameAs) else v for k, v in state_dict.items()}


def optimizer_prefix(index: int) -> str:
    """The prefix of optimizer ``index``'s per-parameter state."""
    return f"optimizer_states.{index}.state."


def flatten(state_dict: Mapping[str, Any], optimizer_states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One flat dict of the module's entries and the per-parameter state of by-name optimizer states."""
    flat = {STATE_DICT + name: value for name, value in state_dict.items()}
    for i, optimizer in enumerate(optimizer_states):
        for name, state in optimizer["state"].items():
            flat.update({f"{optimizer_prefix(i)}{name}.{key}": value for key, value in state.items()})
    return flat


def _parameter_of(key: str, prefix: str) -> str:
    return key[len(prefix) :].rpartition(".")[0]


def select(
    available: Iterable[str], state_dict_names: Iterable[str], parameter_names: Sequence[Iterable[str]]
) -> list[str]:
    """The keys among ``available`` that hold these state-dict entries and, for optimizer ``i``, the
    state of the parameters ``parameter_names[i]``: what one rank reads."""
    available = list(available)
    wanted = {STATE_DICT + name for name in state_dict_names}
    for i, names in enumerate(parameter_names):
        prefix, held = optimizer_prefix(i), set(names)
        wanted.update(k for k in available if k.startswith(prefix) and _parameter_of(k, prefix) in held)
    return [k for k in available if k in wanted]


def unflatten(flat: Mapping[str, Any], optimizers: int) -> tuple[dict[str, Any], list[dict[str, dict]]]:
    """The module's entries and, per optimizer, ``{parameter name: {key: value}}`` from a flat dict."""
    state_dict = {k[len(STATE_DICT) :]: v for k, v in flat.items() if k.startswith(STATE_DICT)}
    states: list[dict[str, dict]] = []
    for i in range(optimizers):
        prefix, state = optimizer_prefix(i), {}
        for key, value in flat.items():
            if key.startswith(prefix):
                name, _, field = key[len(prefix) :].rpartition(".")
                state.setdefault(name, {})[field] = value
        states.append(state)
    return state_dict, states
