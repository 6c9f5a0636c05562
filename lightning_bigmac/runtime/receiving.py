"""The receiving side of a :class:`~lightning_bigmac.runtime.transfer.Transport`: announced
messages, their header phases, and handing them out in the sender's order.

Every message a rank expects is announced in its sender's posting order (:meth:`Receiver.expect`).
Its *header phase* posts the envelope receive, reads the header (and its continuation), and
posts the payload receives; an answer skips the header and posts its payload receives once its
request is sent. With gloo a thread per peer runs the header phases as messages come in (gloo's
tcp transport moves a payload only once its receive is posted, so posting it early saves a round
trip per message); otherwise they progress between ops (:meth:`Receiver.poll`) and in
:meth:`Receiver.recv`. See :mod:`~lightning_bigmac.runtime.transfer` for the whole protocol.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from .link import Link
from .wire import Meta, answer_slots, decode_header, leaf_words, meta_of

__all__ = ["RECEIVING_THREAD", "Receiver"]

RECEIVING_THREAD = "bigmac-recv"
"""Name prefix of the receiving threads (one per peer with gloo)."""


@dataclass(eq=False)
class _Incoming:
    """One announced message. Its *header phase* (``stage`` "queued", "header", then "rest" if the
    header overflows) ends with its payload receives posted (``stage`` "payload") and ``ready``
    set, or with ``error`` set; from then on only the consuming thread touches it.

    An answer (``answers`` set) has no header: once this rank has sent the ``request`` it answers,
    its payload receives are posted from the request's leaves.
    """

    tag: int
    what: str
    answers: int | None = None
    stage: str = "queued"
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    request_sent: threading.Event = field(default_factory=threading.Event)
    request: list[Meta] = field(default_factory=list)
    buf: torch.Tensor | None = None
    works: list[dist.Work] = field(default_factory=list)
    header: list[int] = field(default_factory=list)
    spec: Any = None
    metas: list[Meta] = field(default_factory=list)
    leaves: list[torch.Tensor | None] = field(default_factory=list)


@dataclass(eq=False)
class _Channel:
    """The messages announced from one sender, in its posting order."""

    messages: deque[_Incoming]
    """Not yet handed out."""
    unready: deque[_Incoming]
    """Still in their header phase; run in order by ``pump`` or, without one, between ops."""
    done: dict[int, Any] = field(default_factory=dict)
    received: dict[int, list[Meta]] = field(default_factory=dict)
    """Leaves of the messages handed out, by tag, for answering them (:meth:`Transport.send`)."""
    pump: threading.Thread | None = None
    spare: list[torch.Tensor] = field(default_factory=list)


class Receiver:
    """Announced messages from every peer of one rank, received in each sender's order."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._channels: dict[int, _Channel] = {}
        self._awaiting: dict[tuple[int, int], _Incoming] = {}
        """Answers announced by :meth:`expect`, by (peer, tag of the request they answer)."""
        self._stopped = False

    def expect(self, src: int, messages: Iterable[tuple[int, str, int | None]]) -> None:
        """See :meth:`Transport.expect`."""
        announced = [_Incoming(tag, what, answers) for tag, what, answers in messages]
        chan = _Channel(deque(announced), deque(announced))
        self._channels[src] = chan
        self._awaiting.update({(src, m.answers): m for m in announced if m.answers is not None})
        if self.link.gloo and announced:
            # not a daemon: the interpreter must not finalise while it waits inside gloo (see
            # Transport.abandon)
            chan.pump = threading.Thread(
                target=self._pump, args=(src, chan), name=f"{RECEIVING_THREAD}-{src}"
            )
            chan.pump.start()

    # ---- the sending side's hooks -----------------------------------------------------------
    def request_sent(self, dst: int, tag: int, leaves: list[Any]) -> None:
        """This rank sent message ``tag`` with ``leaves`` to ``dst``: post the receives of its answer."""
        answer = self._awaiting.pop((dst, tag), None)
        if answer is not None:
            answer.request = [meta_of(leaf) for leaf in leaves]
            answer.request_sent.set()

    def request_of(self, dst: int, tag: int, what: str) -> list[Meta]:
        """The leaves of message ``tag`` received from ``dst``, which ``what`` answers."""
        chan = self._channels.get(dst)
        if chan is None or tag not in chan.received:
            raise RuntimeError(
                f"rank {self.link.groups.rank}: {what} answers message {tag} from "
                f"{self.link.describe(dst)}, which this rank has not received"
            )
        return chan.received.pop(tag)

    # ---- header phases ------------------------------------------------------------------------
    def _pump(self, src: int, chan: _Channel) -> None:
        """Thread body: every header phase of ``chan`` in order, each wait bounded by the timeout.

        An error stops it and goes to the message it happened on, for :meth:`recv` to raise.
        """
        try:
            while chan.unready:
                self._advance_headers(src, chan, self.link.watch.deadline())
        except BaseException as err:
            chan.unready[0].error = err
            chan.unready[0].ready.set()

    def _advance_headers(self, src: int, chan: _Channel, deadline: float | None) -> None:
        """Run ``chan``'s header phases in order: without waiting (``deadline`` None) as far as
        completed receives allow, else until the first unready message is ready."""
        while chan.unready:
            msg = chan.unready[0]
            if not self._header_step(src, msg, deadline):
                return
            if msg.stage == "payload":
                chan.unready.popleft()
                msg.ready.set()
                if deadline is not None:
                    return

    def _header_step(self, src: int, msg: _Incoming, deadline: float | None) -> bool:
        """Move ``msg``'s header phase one stage on, waiting for its receive (or, for an answer,
        its request) only when ``deadline`` is given; returns whether it moved."""
        link = self.link
        if msg.stage == "queued":
            if msg.answers is not None:
                if not self._request_sent(src, msg, deadline):
                    return False
                slots = answer_slots(msg.request)
                msg.spec = pytree.tree_structure([None] * len(slots))
                self._post_leaves(src, msg, [None if s is None else (s[0], False, s[1]) for s in slots], 0)
                return True
            spare = self._channels[src].spare  # envelopes already read: no allocation per message
            msg.stage, msg.buf = "header", spare.pop() if spare else self._empty(link.envelope)
            msg.works = [link.irecv(msg.buf, src, msg.tag, 0, msg.what)]
            return True
        work = msg.works[0]
        if deadline is None and not work.is_completed():
            return False
        link.wait(work, time.monotonic() + 1.0 if deadline is None else deadline, src, msg.what)
        envelope, msg.buf, first = msg.buf, None, msg.stage == "header"
        if first:
            self._read_header(src, msg, envelope)
            if msg.header[0] > link.envelope:
                self._channels[src].spare.append(envelope)
                msg.stage, msg.buf = "rest", self._empty(msg.header[0] - link.envelope)
                msg.works = [link.irecv(msg.buf, src, msg.tag, 1, msg.what)]
                return True
        else:
            msg.header += envelope.tolist()
        msg.spec, metas = decode_header(msg.header)
        msg.works = []
        if msg.header[4]:
            self._unpack_inline(msg, metas, envelope)
        else:
            self._post_leaves(src, msg, metas, 2 if msg.stage == "rest" else 1)
        if first:
            self._channels[src].spare.append(envelope)
        return True

    def _empty(self, words: int) -> torch.Tensor:
        return torch.empty(words, dtype=torch.int64, device=self.link.device)

    def _request_sent(self, src: int, msg: _Incoming, deadline: float | None) -> bool:
        """Whether this rank has sent the request ``msg`` answers, waiting for it until ``deadline``."""
        if deadline is None or msg.request_sent.is_set():
            return msg.request_sent.is_set()
        if not msg.request_sent.wait(max(deadline - time.monotonic(), 0.0)):
            raise RuntimeError(
                f"rank {self.link.groups.rank}: the message {msg.what} answers was not sent to "
                f"{self.link.describe(src)} within {self.link.watch.timeout:g}s"
            )
        if self._stopped:
            raise RuntimeError(f"rank {self.link.groups.rank}: stopped receiving (the step failed)")
        return True

    def _read_header(self, src: int, msg: _Incoming, envelope: torch.Tensor) -> None:
        msg.header = envelope[: min(int(envelope[0]), self.link.envelope)].tolist()
        if msg.header[1] != msg.tag:
            raise RuntimeError(
                f"rank {self.link.groups.rank}: expected message {msg.tag} ({msg.what}) from "
                f"{self.link.describe(src)} but got {msg.header[1]}: sender and receiver disagree on "
                "the message order"
            )

    def _unpack_inline(self, msg: _Incoming, metas: list[Meta], envelope: torch.Tensor) -> None:
        """Copy the leaves ``metas`` describe out of ``envelope`` and end the header phase."""
        raw, pos = envelope.view(torch.uint8), msg.header[0] * 8
        msg.stage, msg.metas, msg.leaves = "payload", metas, []
        for meta in metas:
            leaf = None if meta is None else torch.empty(meta[2], dtype=meta[0], device=self.link.device)
            if leaf is not None:
                n = leaf.numel() * leaf.element_size()
                leaf.view(-1).view(torch.uint8).copy_(raw[pos : pos + n])
                pos += leaf_words(leaf) * 8
            msg.leaves.append(leaf)

    def _post_leaves(self, src: int, msg: _Incoming, metas: list[Meta], part: int) -> None:
        """Allocate the leaves ``metas`` describe, post a receive for each non-empty one (sub-messages
        from ``part`` on) and end the header phase."""
        msg.stage, msg.metas, msg.leaves = "payload", metas, []
        for meta in metas:
            leaf = None if meta is None else torch.empty(meta[2], dtype=meta[0], device=self.link.device)
            if leaf is not None and leaf.numel() > 0:
                msg.works.append(self.link.irecv(leaf, src, msg.tag, part, msg.what))
                part += 1
            msg.leaves.append(leaf)

    # ---- handing out ----------------------------------------------------------------------------
    def poll(self) -> None:
        """See :meth:`Transport.poll`."""
        for src, chan in self._channels.items():
            if chan.pump is None:
                self._advance_headers(src, chan, None)

    def recv(self, src: int, tag: int, what: str) -> Any:
        """See :meth:`Transport.recv`; raises :class:`~.watch.Lost` on a lost peer."""
        deadline = self.link.watch.deadline()
        chan = self._channels.get(src)
        while chan is None or tag not in chan.done:
            if chan is None or not chan.messages:
                raise RuntimeError(
                    f"rank {self.link.groups.rank}: {what} waits for message {tag} from "
                    f"{self.link.describe(src)} that was never announced with expect()"
                )
            self._take(src, chan, deadline, what)
        return chan.done.pop(tag)

    def _take(self, src: int, chan: _Channel, deadline: float, needed: str) -> None:
        """Receive ``chan``'s oldest message completely, into ``chan.done``."""
        msg = chan.messages[0]
        what = msg.what if msg.what == needed else f"{msg.what} (read before {needed})"
        if chan.pump is None:
            while not msg.ready.is_set():
                self._advance_headers(src, chan, deadline)
        elif not msg.ready.wait(max(deadline - time.monotonic(), 0.0)):
            raise self.link.timed_out(src, what, sending=False)
        if msg.error is not None:
            raise msg.error
        for work in msg.works:
            self.link.wait(work, deadline, src, what)
        for leaf, meta in zip(msg.leaves, msg.metas, strict=True):
            if leaf is not None and meta[1]:
                leaf.requires_grad_(True)
        chan.messages.popleft()
        chan.received[msg.tag] = msg.metas
        chan.done[msg.tag] = pytree.tree_unflatten(msg.leaves, msg.spec)

    def idle(self) -> bool:
        """Whether every announced message was received and handed out."""
        return not any(chan.messages or chan.done for chan in self._channels.values())

    def stop(self, timeout: float) -> None:
        """End every receiving thread once the channels are severed (gloo waits then fail): wake
        those waiting for a request this rank will not send, and join them (up to ``timeout`` s)."""
        self._stopped = True
        for answer in self._awaiting.values():
            answer.request_sent.set()
        for chan in self._channels.values():
            if chan.pump is not None:
                chan.pump.join(timeout)
