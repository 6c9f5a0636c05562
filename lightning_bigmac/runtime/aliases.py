"""Parameters named more than once (tied embeddings), and making them one object again.

``to_empty``, ``load_state_dict(assign=True)`` and moving a part to the meta device each make a
new parameter per name, so a parameter that two names shared becomes two: the optimizer would
step them apart. Record the names first, then tie them again.
"""

from __future__ import annotations

from torch import nn

__all__ = ["parameter_aliases", "retie"]


def parameter_aliases(module: nn.Module, *, held_only: bool = False) -> dict[str, str]:
    """``{name: first name}`` for every parameter name of ``module`` that names the same parameter
    as an earlier name; ``held_only``: only parameters that are not on the meta device."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if not (held_only and p.is_meta) and first.setdefault(id(p), name) != name:
            aliases[name] = first[id(p)]
    return aliases


def retie(module: nn.Module, aliases: dict[str, str]) -> None:
    """Make each name of ``aliases`` (from :func:`parameter_aliases`) name its first name's parameter."""
    for name, first in aliases.items():
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, module.get_parameter(first))
