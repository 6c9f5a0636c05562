"""The errors the runtime raises when a step cannot go on.

A pipeline rank waits on its peers all the time (activations, gradients, collectives); when one
dies or hangs, every survivor must stop with an error that names the peer, the op and the step,
instead of waiting forever or dying by abort. When the user's own code fails inside a step, the
error must say where (rank, op, microbatch), or a traceback from deep inside a stage leaves the
reader guessing which of the many interleaved microbatches broke it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["OpError", "PeerError", "describe_microbatch"]


class PeerError(RuntimeError):
    """A message from or to a peer, or a collective with it, did not complete: the peer died, hung,
    or failed itself. The message names this rank, the step, the op and, as far as this rank can
    find out, the peer that failed first."""


class OpError(RuntimeError):
    """The user's module raised during one op of a step; chained to the original exception."""


def describe_microbatch(mb: Any, limit: int = 160) -> str:
    """What ``mb`` holds, briefly: each leaf's path with its dtype and shape (for error messages)."""
    parts = []
    for path, leaf in pytree.tree_flatten_with_path(mb)[0]:
        key = pytree.keystr(path).replace("['", ".").replace("']", "").lstrip(".") or "value"
        if isinstance(leaf, torch.Tensor):
            parts.append(f"{key} {str(leaf.dtype).removeprefix('torch.')}{list(leaf.shape)}")
        else:
            parts.append(f"{key} {type(leaf).__name__}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."
