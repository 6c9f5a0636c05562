"""The errors the runtime raises when a peer fails it.

A pipeline rank waits on its peers all the time (activations, gradients, collectives); when one
dies or hangs, every survivor must stop with an error that names the peer, the op and the step,
instead of waiting forever or dying by abort.
"""

from __future__ import annotations

__all__ = ["PeerError"]


class PeerError(RuntimeError):
    """A message from or to a peer did not complete: the peer died or never sent it in time."""
