"""Point-to-point transfer of pytrees of tensors between pipeline ranks, with shape headers.

Every microbatch may have its own sequence length and image count, so nothing is padded and no
receive buffer is sized in advance: each message starts with a fixed-size int64 *envelope* that
holds its header (:mod:`~lightning_bigmac.runtime.wire`), followed by one payload transfer per
non-empty tensor leaf, or by nothing when the leaves fit in the envelope after the header. The
envelope is :data:`HEADER_SLOTS` words, or ``inline_bytes`` (:class:`Transport`) if larger: gloo
defaults to :data:`GLOO_INLINE_BYTES`, which holds a CPU-sized model's activations.

Message matching. Gloo matches by ``(peer, tag)``; NCCL ignores tags and matches operations in
posting order on a communicator. Messages from ``a`` to ``b`` travel on a group of their own
(:class:`~lightning_bigmac.runtime.groups.PipelineGroups` ``channels``), and the receiver reads
them in exactly the order the sender posts them (the executor computes that order from the
plan), so both rules give the same pairing. Tags are unique per message within a step
(:func:`~lightning_bigmac.runtime.routes.Routes`) and sub-messages take ``tag * PARTS + i``.

Sends are asynchronous (the validator's deadlock-freedom assumes it): :meth:`Transport.send`
posts ``isend`` and keeps the buffers alive until the work completes. Receives block, with a
deadline: a peer that died or a message that never comes raises :class:`PeerError` naming the
peer, the op and the step instead of hanging (:mod:`~lightning_bigmac.runtime.watch`).

Answers. A message of gradients going back for a message this rank sent (an *answer*, see
:meth:`Transport.expect`) has no header at all: it holds one tensor per leaf of the message it
answers that requires grad, with that leaf's dtype and shape, so the receiver knows every size
the moment it sends the request. A ``None`` gradient (an input its stage did not use) travels as
zeros, which backward treats exactly like ``None``. Half of all messages thus cost one transfer
per tensor and no header.

Latency. Gloo's tcp transport sends a payload only once the receiver has posted its receive (a
round trip otherwise), and on a few shared cores every hop waits for a time slice. So receives
are posted early, still in the sender's order: every envelope receive as soon as the previous
message's payload receives are posted, a payload's receives as soon as its header is in (on a
receiving thread per peer with gloo), and an answer's receives when its request is sent. An
inline message needs no round trip at all: its envelope receive was posted before it was sent.
The price is one envelope per peer and one gradient-sized buffer per answer in flight.

The sending side lives here, the receiving side in :mod:`~lightning_bigmac.runtime.receiving`,
what both share (addresses, tags, waits) in :mod:`~lightning_bigmac.runtime.link`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from .collectives import sever_all
from .errors import PeerError
from .groups import PipelineGroups
from .link import GLOO_INLINE_BYTES, HEADER_SLOTS, PARTS, Link
from .receiving import Receiver
from .watch import DEFAULT_TIMEOUT, Lost, PeerWatch
from .wire import answer_payload, answer_slots, encode_header, leaf_words

__all__ = ["GLOO_INLINE_BYTES", "HEADER_SLOTS", "PARTS", "PeerError", "Transport"]


class Transport:
    """Sends and receives pytrees between the ranks of one pipeline (pipeline ranks as addresses).

    ``device`` is where payloads live: CPU for gloo, the rank's GPU for NCCL (headers too, since
    NCCL moves only device tensors). ``timeout`` (seconds) bounds every wait; :attr:`watch` holds
    it, the step being run, and turns a lost peer into a :class:`PeerError`. ``match_by_order``
    puts tag 0 on the wire so gloo pairs messages by posting order alone, as NCCL does: tests use
    it to prove on CPU that the receive order is right for NCCL (the header still carries the tag
    and is checked). ``inline_bytes``: the envelope size (see the module docstring); None gives
    :data:`GLOO_INLINE_BYTES` with gloo and the bare header otherwise (NCCL moves large messages
    fast, and an envelope costs a device copy), also with ``match_by_order``, which emulates NCCL.
    """

    def __init__(
        self,
        groups: PipelineGroups,
        *,
        device: torch.device | str = "cpu",
        timeout: float = DEFAULT_TIMEOUT,
        match_by_order: bool = False,
        inline_bytes: int | None = None,
    ):
        self.watch = PeerWatch(groups.rank, timeout, groups.beacon)
        self.link = Link(groups, torch.device(device), self.watch, match_by_order, inline_bytes)
        self.receiver = Receiver(self.link)
        self._pending: list[tuple[dist.Work, list[torch.Tensor], int, str]] = []

    # ---- sending ----------------------------------------------------------------------------
    def send(self, tree: Any, dst: int, tag: int, *, what: str, answers: int | None = None) -> None:
        """Post the sends of ``tree`` to pipeline rank ``dst`` and return at once.

        Tensors are sent detached; ``requires_grad`` travels in the header so the receiver can
        make its copy a leaf of its own graph. ``what`` (the consuming op) names the message in errors.
        ``answers``: the tag of the message from ``dst`` that this one answers with gradients, one
        list entry per leaf of it (see :meth:`expect`); ``dst`` has posted its receives already.
        """
        link = self.link
        leaves, spec = pytree.tree_flatten(tree)
        if len(leaves) > PARTS - 2:
            raise ValueError(f"{what}: {len(leaves)} tensors cross the stage but at most {PARTS - 2} may")
        if answers is None:
            payload = [leaf.detach().contiguous() for leaf in leaves if leaf is not None and leaf.numel() > 0]
            header = encode_header(tag, spec, leaves)
            if len(header) + sum(leaf_words(leaf) for leaf in payload) <= link.envelope:
                header[4] = 1  # inline
                bufs = self._envelope(header, payload)
            else:
                bufs = self._envelope(header, []) + payload
        else:
            slots = answer_slots(self.receiver.request_of(dst, answers, what))
            bufs = answer_payload(leaves, spec, slots, link.device, what)
        try:
            for part, buf in enumerate(bufs):
                self._pending.append((link.isend(buf, dst, tag, part, what), [buf], dst, what))
        except Lost as lost:
            raise self.watch.failure(lost) from lost.cause
        self.receiver.request_sent(dst, tag, leaves)
        self._prune()

    def _envelope(self, header: list[int], inline: list[torch.Tensor]) -> list[torch.Tensor]:
        """The envelope holding ``header`` and the leaves ``inline`` (which must fit), and the
        header's continuation if it does not fit (see the module docstring).

        Gloo fills a receive from a shorter send, so there only the used part of the envelope
        travels; NCCL needs equal sizes (and so does ``match_by_order``, which stands in for it).
        """
        link = self.link
        used = len(header) + sum(leaf_words(leaf) for leaf in inline)
        size = min(used, link.envelope) if link.gloo and not link.match_by_order else link.envelope
        words = np.zeros(max(len(header), size), dtype=np.int64)
        words[: len(header)] = header
        bufs = [torch.from_numpy(words[:size])]
        if len(header) > size:
            bufs.append(torch.from_numpy(words[size:]))
        bufs = [buf.to(link.device) for buf in bufs]
        raw, pos = bufs[0].view(torch.uint8), len(header) * 8
        for leaf in inline:
            n = leaf.numel() * leaf.element_size()
            raw[pos : pos + n].copy_(leaf.reshape(-1).view(torch.uint8))
            pos += leaf_words(leaf) * 8
        return bufs

    def _prune(self) -> None:
        """Drop the buffers of completed sends so memory follows the schedule, not the step."""
        self._pending = [p for p in self._pending if not p[0].is_completed()]

    def flush(self) -> None:
        """Wait for every posted send (at the end of a step); raises :class:`PeerError` on a lost peer."""
        deadline = self.watch.deadline()
        pending, self._pending = self._pending, []
        for work, _bufs, dst, what in pending:
            self.watch.blocked((self.link.peer(dst),), what)
            try:
                self.link.wait(work, deadline, dst, what, sending=True)
            except Lost as lost:
                raise self.watch.failure(lost) from lost.cause
        self.watch.unblocked()

    # ---- receiving --------------------------------------------------------------------------
    def expect(self, src: int, messages: Iterable[tuple[int, str, int | None]]) -> None:
        """Announce the messages ``(tag, what, answers)`` that ``src`` will send, in its posting order.

        Their header receives are posted one after the other, each once the previous message's
        payload receives are posted, so the receive order on the channel is the sender's order.
        With gloo a thread of its own runs this for ``src`` from now on: gloo's tcp transport
        moves a payload only once its receive is posted, so posting it as soon as the header is
        in, rather than when the consuming op comes, saves a round trip between busy ranks per
        message. Otherwise it progresses between ops (:meth:`poll`) and in :meth:`recv`.

        ``answers`` (or None) is the tag of a message this rank sends to ``src`` that this one
        answers with its gradients: a flat list with, per leaf of that request, a tensor of the
        leaf's dtype and shape where it requires grad, else None (``send(..., answers=)`` on the
        other end). Such a message's receives are all posted as soon as the request is sent, so
        the peer's sends go out at once instead of waiting for a round trip.
        """
        self.receiver.expect(src, messages)

    def poll(self) -> None:
        """Progress the header phases the compute thread runs as far as possible without blocking
        (call between ops)."""
        try:
            self.receiver.poll()
        except Lost as lost:
            raise self.watch.failure(lost) from lost.cause
        self._prune()

    def recv(self, src: int, tag: int, *, what: str) -> Any:
        """The pytree that pipeline rank ``src`` sent with ``tag`` (announced by :meth:`expect`).

        Blocks up to the timeout, reading ``src``'s earlier messages first when they are not in
        yet. Float leaves the sender had with ``requires_grad`` come back as fresh leaves
        requiring grad.
        """
        self.watch.blocked((self.link.peer(src),), what)
        try:
            return self.receiver.recv(src, tag, what)
        except Lost as lost:
            raise self.watch.failure(lost) from lost.cause
        finally:
            self.watch.unblocked()

    def idle(self) -> bool:
        """Whether every announced message was received and handed out."""
        return self.receiver.idle()

    def abandon(self) -> None:
        """After a failure: close every connection of this rank, so that its peers fail at once
        instead of at their timeout, and end the receiving threads.

        A receiving thread that returns from a gloo wait while the interpreter finalises is
        unwound through C++ code that must not be, and aborts the process ("terminate called
        without an active exception"); a failed rank must exit with its error instead.
        """
        sever_all(self.link.groups)
        self.receiver.stop(self.watch.timeout)

    # ---- set-up --------------------------------------------------------------------------
    def connect(self) -> None:
        """Exchange one tiny message on every channel, in one global order.

        NCCL creates a communicator on its first use, blocking until both ends join; doing that
        for all channels here, in an order every rank agrees on, keeps it out of the step where
        it could wait on a peer that is itself waiting. It also proves every link works.
        """
        groups = self.link.groups
        me = groups.pipeline_rank
        for src in range(groups.pp):
            for dst in range(groups.pp):
                if me in (src, dst) and src != dst:
                    if me == src:
                        self.send(None, dst, 0, what="connect")
                        self.flush()
                    else:
                        self.expect(src, [(0, "connect", None)])
                        self.recv(src, 0, what="connect")
