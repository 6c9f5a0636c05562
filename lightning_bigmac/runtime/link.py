"""One pipeline rank's end of its directed channels, shared by the sending side of a
:class:`~lightning_bigmac.runtime.transfer.Transport` and its receiving side
(:mod:`~lightning_bigmac.runtime.receiving`): who a pipeline rank is, which group carries a
message, the tag of each sub-message, the envelope size, and bounded waits that name the peer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import PipelineGroups
from .watch import Lost, PeerWatch, finish

__all__ = ["GLOO_INLINE_BYTES", "HEADER_SLOTS", "PARTS", "Link"]

HEADER_SLOTS = 256
"""int64 words of the smallest envelope (2 KiB); longer headers continue in a second message."""
GLOO_INLINE_BYTES = 256 * 1024
"""Envelope size with gloo: a message up to this size (header included) is one transfer."""
PARTS = 4096
"""Sub-messages per message: header, header overflow and up to ``PARTS - 2`` tensor leaves."""
_MAX_TAG = 2**31 - 1


class Link:
    """Addresses, tags and waits of one rank's channels (see :class:`Transport` for the arguments)."""

    def __init__(
        self,
        groups: PipelineGroups,
        device: torch.device,
        watch: PeerWatch,
        match_by_order: bool,
        inline_bytes: int | None,
    ) -> None:
        self.groups, self.device, self.watch = groups, device, watch
        self.match_by_order = match_by_order
        self.gloo = dist.get_backend(groups.pipeline_group) == "gloo"
        if inline_bytes is None:
            inline_bytes = GLOO_INLINE_BYTES if self.gloo and not match_by_order else 0
        if inline_bytes < 0:
            raise ValueError(f"inline_bytes must be >= 0, got {inline_bytes}")
        self.envelope = max(HEADER_SLOTS, inline_bytes // 8)
        """int64 words of every message's first transfer (both ends must agree)."""

    def peer(self, pipeline_rank: int) -> int:
        """The global rank of ``pipeline_rank``."""
        return self.groups.pipeline_ranks[pipeline_rank]

    def describe(self, pipeline_rank: int) -> str:
        return f"rank {self.peer(pipeline_rank)}"

    def sub_tag(self, tag: int, part: int) -> int:
        if self.match_by_order:
            return 0
        sub = tag * PARTS + part
        if not 0 <= sub <= _MAX_TAG:
            raise ValueError(
                f"message tag {tag} is too large for {PARTS} parts: fewer microbatches or stages"
            )
        return sub

    def isend(self, buf: torch.Tensor, dst: int, tag: int, part: int, what: str) -> dist.Work:
        """Post the send of ``buf`` (gloo refuses at once when ``dst``'s connection is broken)."""
        group = self.groups.channels[(self.groups.pipeline_rank, dst)]
        try:
            return dist.isend(buf, dst=self.peer(dst), group=group, tag=self.sub_tag(tag, part))
        except RuntimeError as err:
            raise self.lost(dst, what, err, sending=True) from err

    def irecv(self, buf: torch.Tensor, src: int, tag: int, part: int, what: str) -> dist.Work:
        group = self.groups.channels[(src, self.groups.pipeline_rank)]
        try:
            return dist.irecv(buf, src=self.peer(src), group=group, tag=self.sub_tag(tag, part))
        except RuntimeError as err:
            raise self.lost(src, what, err) from err

    def wait(self, work: dist.Work, deadline: float, peer: int, what: str, sending: bool = False) -> None:
        """Wait for ``work`` until ``deadline``; a timeout or a broken connection raises :class:`Lost`."""
        try:
            finish(work, deadline, self.gloo)
        except TimeoutError:
            raise self.timed_out(peer, what, sending) from None
        except RuntimeError as err:
            raise self.lost(peer, what, err, sending) from err

    def lost(self, peer: int, what: str, err: BaseException, sending: bool = False) -> Lost:
        doing = "sending" if sending else "waiting for"
        return Lost((self.peer(peer),), f"lost {self.describe(peer)} while {doing} {what}", err)

    def timed_out(self, peer: int, what: str, sending: bool) -> Lost:
        who = self.describe(peer)
        problem = f"{who} did not take" if sending else f"no message from {who} for"
        return Lost((self.peer(peer),), f"{problem} {what} within {self.watch.timeout:g}s")
