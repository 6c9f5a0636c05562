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
peer and the op instead of hanging.

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
"""

from __future__ import annotations

import datetime
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from .errors import PeerError
from .groups import PipelineGroups
from .wire import Meta, answer_payload, answer_slots, decode_header, encode_header, leaf_words, meta_of

__all__ = ["GLOO_INLINE_BYTES", "HEADER_SLOTS", "PARTS", "PeerError", "Transport"]

HEADER_SLOTS = 256
"""int64 words of the smallest envelope (2 KiB); longer headers continue in a second message."""
GLOO_INLINE_BYTES = 256 * 1024
"""Envelope size with gloo: a message up to this size (header included) is one transfer."""
PARTS = 4096
"""Sub-messages per message: header, header overflow and up to ``PARTS - 2`` tensor leaves."""
_MAX_TAG = 2**31 - 1


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


class Transport:
    """Sends and receives pytrees between the ranks of one pipeline (pipeline ranks as addresses).

    ``device`` is where payloads live: CPU for gloo, the rank's GPU for NCCL (headers too, since
    NCCL moves only device tensors). ``timeout`` (seconds) bounds every wait. ``match_by_order``
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
        timeout: float = 300.0,
        match_by_order: bool = False,
        inline_bytes: int | None = None,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.groups = groups
        self.device = torch.device(device)
        self.timeout = float(timeout)
        self.match_by_order = match_by_order
        self._pending: list[tuple[dist.Work, list[torch.Tensor], int, str]] = []
        self._gloo = dist.get_backend(groups.pipeline_group) == "gloo"
        if inline_bytes is None:
            inline_bytes = GLOO_INLINE_BYTES if self._gloo and not match_by_order else 0
        if inline_bytes < 0:
            raise ValueError(f"inline_bytes must be >= 0, got {inline_bytes}")
        self.envelope = max(HEADER_SLOTS, inline_bytes // 8)
        """int64 words of every message's first transfer (both ends must agree)."""
        self._channels: dict[int, _Channel] = {}
        self._awaiting: dict[tuple[int, int], _Incoming] = {}
        """Answers announced by :meth:`expect`, by (peer, tag of the request they answer)."""

    # ---- addressing -------------------------------------------------------------------------
    def _peer(self, pipeline_rank: int) -> int:
        return self.groups.pipeline_ranks[pipeline_rank]

    def _describe(self, pipeline_rank: int) -> str:
        return f"rank {self._peer(pipeline_rank)}"

    def _sub_tag(self, tag: int, part: int) -> int:
        if self.match_by_order:
            return 0
        sub = tag * PARTS + part
        if not 0 <= sub <= _MAX_TAG:
            raise ValueError(
                f"message tag {tag} is too large for {PARTS} parts: fewer microbatches or stages"
            )
        return sub

    # ---- sending ----------------------------------------------------------------------------
    def send(self, tree: Any, dst: int, tag: int, *, what: str, answers: int | None = None) -> None:
        """Post the sends of ``tree`` to pipeline rank ``dst`` and return at once.

        Tensors are sent detached; ``requires_grad`` travels in the header so the receiver can
        make its copy a leaf of its own graph. ``what`` (the consuming op) names the message in errors.
        ``answers``: the tag of the message from ``dst`` that this one answers with gradients, one
        list entry per leaf of it (see :meth:`expect`); ``dst`` has posted its receives already.
        """
        leaves, spec = pytree.tree_flatten(tree)
        if len(leaves) > PARTS - 2:
            raise ValueError(f"{what}: {len(leaves)} tensors cross the stage but at most {PARTS - 2} may")
        if answers is None:
            payload = [leaf.detach().contiguous() for leaf in leaves if leaf is not None and leaf.numel() > 0]
            header = encode_header(tag, spec, leaves)
            if len(header) + sum(leaf_words(leaf) for leaf in payload) <= self.envelope:
                header[4] = 1  # inline
                bufs = self._envelope(header, payload)
            else:
                bufs = self._envelope(header, []) + payload
        else:
            slots = answer_slots(self._request_of(dst, answers, what))
            bufs = answer_payload(leaves, spec, slots, self.device, what)
        group, peer = self.groups.channels[(self.groups.pipeline_rank, dst)], self._peer(dst)
        for part, buf in enumerate(bufs):
            sub = self._sub_tag(tag, part)
            self._pending.append((dist.isend(buf, dst=peer, group=group, tag=sub), [buf], dst, what))
        answer = self._awaiting.pop((dst, tag), None)
        if answer is not None:
            answer.request = [meta_of(leaf) for leaf in leaves]
            answer.request_sent.set()
        self._prune()

    def _envelope(self, header: list[int], inline: list[torch.Tensor]) -> list[torch.Tensor]:
        """The envelope holding ``header`` and the leaves ``inline`` (which must fit), and the
        header's continuation if it does not fit (see the module docstring).

        Gloo fills a receive from a shorter send, so there only the used part of the envelope
        travels; NCCL needs equal sizes (and so does ``match_by_order``, which stands in for it).
        """
        used = len(header) + sum(leaf_words(leaf) for leaf in inline)
        size = min(used, self.envelope) if self._gloo and not self.match_by_order else self.envelope
        words = np.zeros(max(len(header), size), dtype=np.int64)
        words[: len(header)] = header
        bufs = [torch.from_numpy(words[:size])]
        if len(header) > size:
            bufs.append(torch.from_numpy(words[size:]))
        bufs = [buf.to(self.device) for buf in bufs]
        raw, pos = bufs[0].view(torch.uint8), len(header) * 8
        for leaf in inline:
            n = leaf.numel() * leaf.element_size()
            raw[pos : pos + n].copy_(leaf.reshape(-1).view(torch.uint8))
            pos += leaf_words(leaf) * 8
        return bufs

    def _request_of(self, dst: int, tag: int, what: str) -> list[Meta]:
        """The leaves of message ``tag`` received from ``dst``, which ``what`` answers."""
        chan = self._channels.get(dst)
        if chan is None or tag not in chan.received:
            raise RuntimeError(
                f"rank {self.groups.rank}: {what} answers message {tag} from {self._describe(dst)}, "
                "which this rank has not received"
            )
        return chan.received.pop(tag)

    def _prune(self) -> None:
        """Drop the buffers of completed sends so memory follows the schedule, not the step."""
        self._pending = [p for p in self._pending if not p[0].is_completed()]

    def flush(self) -> None:
        """Wait for every posted send (at the end of a step); raises :class:`PeerError` on a lost peer."""
        deadline = time.monotonic() + self.timeout
        pending, self._pending = self._pending, []
        for work, _bufs, dst, what in pending:
            self._wait(work, deadline, dst, what, sending=True)

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
        announced = [_Incoming(tag, what, answers) for tag, what, answers in messages]
        chan = _Channel(deque(announced), deque(announced))
        self._channels[src] = chan
        self._awaiting.update({(src, m.answers): m for m in announced if m.answers is not None})
        if self._gloo and announced:
            chan.pump = threading.Thread(
                target=self._pump, args=(src, chan), name=f"bigmac-recv-{src}", daemon=True
            )
            chan.pump.start()

    def _pump(self, src: int, chan: _Channel) -> None:
        """Thread body: every header phase of ``chan`` in order, each wait bounded by the timeout.

        An error stops it and goes to the message it happened on, for :meth:`recv` to raise.
        """
        try:
            while chan.unready:
                self._advance_headers(src, chan, time.monotonic() + self.timeout)
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
        if msg.stage == "queued":
            if msg.answers is not None:
                if not self._request_sent(src, msg, deadline):
                    return False
                slots = answer_slots(msg.request)
                msg.spec = pytree.tree_structure([None] * len(slots))
                self._post_leaves(src, msg, [None if s is None else (s[0], False, s[1]) for s in slots], 0)
                return True
            spare = self._channels[src].spare  # envelopes already read: no allocation per message
            msg.stage, msg.buf = "header", spare.pop() if spare else self._empty(self.envelope)
            msg.works = [self._irecv(msg.buf, src, msg.tag, 0)]
            return True
        work = msg.works[0]
        if deadline is None and not work.is_completed():
            return False
        self._wait(work, time.monotonic() + 1.0 if deadline is None else deadline, src, msg.what)
        envelope, msg.buf, first = msg.buf, None, msg.stage == "header"
        if first:
            self._read_header(src, msg, envelope)
            if msg.header[0] > self.envelope:
                self._channels[src].spare.append(envelope)
                msg.stage, msg.buf = "rest", self._empty(msg.header[0] - self.envelope)
                msg.works = [self._irecv(msg.buf, src, msg.tag, 1)]
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
        return torch.empty(words, dtype=torch.int64, device=self.device)

    def _request_sent(self, src: int, msg: _Incoming, deadline: float | None) -> bool:
        """Whether this rank has sent the request ``msg`` answers, waiting for it until ``deadline``."""
        if deadline is None or msg.request_sent.is_set():
            return msg.request_sent.is_set()
        if not msg.request_sent.wait(max(deadline - time.monotonic(), 0.0)):
            raise RuntimeError(
                f"rank {self.groups.rank}: the message {msg.what} answers was not sent to "
                f"{self._describe(src)} within {self.timeout:g}s"
            )
        return True

    def _read_header(self, src: int, msg: _Incoming, envelope: torch.Tensor) -> None:
        msg.header = envelope[: min(int(envelope[0]), self.envelope)].tolist()
        if msg.header[1] != msg.tag:
            raise RuntimeError(
                f"rank {self.groups.rank}: expected message {msg.tag} ({msg.what}) from "
                f"{self._describe(src)} but got {msg.header[1]}: sender and receiver disagree on "
                "the message order"
            )

    def _unpack_inline(self, msg: _Incoming, metas: list[Meta], envelope: torch.Tensor) -> None:
        """Copy the leaves ``metas`` describe out of ``envelope`` and end the header phase."""
        raw, pos = envelope.view(torch.uint8), msg.header[0] * 8
        msg.stage, msg.metas, msg.leaves = "payload", metas, []
        for meta in metas:
            leaf = None if meta is None else torch.empty(meta[2], dtype=meta[0], device=self.device)
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
            leaf = None if meta is None else torch.empty(meta[2], dtype=meta[0], device=self.device)
            if leaf is not None and leaf.numel() > 0:
                msg.works.append(self._irecv(leaf, src, msg.tag, part))
                part += 1
            msg.leaves.append(leaf)

    def _irecv(self, buf: torch.Tensor, src: int, tag: int, part: int) -> dist.Work:
        group = self.groups.channels[(src, self.groups.pipeline_rank)]
        return dist.irecv(buf, src=self._peer(src), group=group, tag=self._sub_tag(tag, part))

    def poll(self) -> None:
        """Progress the header phases the compute thread runs as far as possible without blocking
        (call between ops)."""
        for src, chan in self._channels.items():
            if chan.pump is None:
                self._advance_headers(src, chan, None)
        self._prune()

    def recv(self, src: int, tag: int, *, what: str) -> Any:
        """The pytree that pipeline rank ``src`` sent with ``tag`` (announced by :meth:`expect`).

        Blocks up to the timeout, reading ``src``'s earlier messages first when they are not in
        yet. Float leaves the sender had with ``requires_grad`` come back as fresh leaves
        requiring grad.
        """
        deadline = time.monotonic() + self.timeout
        chan = self._channels.get(src)
        while chan is None or tag not in chan.done:
            if chan is None or not chan.messages:
                raise RuntimeError(
                    f"rank {self.groups.rank}: {what} waits for message {tag} from {self._describe(src)} "
                    "that was never announced with expect()"
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
            raise self._timed_out(src, what, sending=False)
        if msg.error is not None:
            raise msg.error
        for work in msg.works:
            self._wait(work, deadline, src, what)
        for leaf, meta in zip(msg.leaves, msg.metas, strict=True):
            if leaf is not None and meta[1]:
                leaf.requires_grad_(True)
        chan.messages.popleft()
        chan.received[msg.tag] = msg.metas
        chan.done[msg.tag] = pytree.tree_unflatten(msg.leaves, msg.spec)

    def idle(self) -> bool:
        """Whether every announced message was received and handed out."""
        return not any(chan.messages or chan.done for chan in self._channels.values())

    # ---- waiting ----------------------------------------------------------------------------
    def _wait(self, work: dist.Work, deadline: float, peer: int, what: str, sending: bool = False) -> None:
        """Wait for ``work`` until ``deadline``; turn a timeout or a broken connection into PeerError.

        Gloo's ``Work.wait(timeout)`` honours the timeout. NCCL's ``wait`` only orders streams, so
        for it the host polls ``is_completed`` against the deadline.
        """
        remaining = deadline - time.monotonic()
        try:
            if not self._gloo:
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    time.sleep(1e-4)
            work.wait(datetime.timedelta(seconds=max(remaining, 1e-3)))
        except Exception as err:
            text = str(err)
            if isinstance(err, TimeoutError) or "Timed out" in text or "timed out" in text:
                raise self._timed_out(peer, what, sending) from None
            doing = "sending" if sending else "waiting for"
            raise PeerError(
                f"rank {self.groups.rank}: lost {self._describe(peer)} while {doing} {what}: "
                f"{text.splitlines()[0]}"
            ) from err

    def _timed_out(self, peer: int, what: str, sending: bool) -> PeerError:
        who = self._describe(peer)
        problem = f"{who} did not take" if sending else f"no message from {who} for"
        return PeerError(f"rank {self.groups.rank}: {problem} {what} within {self.timeout:g}s (peer lost?)")

    # ---- set-up --------------------------------------------------------------------------
    def connect(self) -> None:
        """Exchange one tiny message on every channel, in one global order.

        NCCL creates a communicator on its first use, blocking until both ends join; doing that
        for all channels here, in an order every rank agrees on, keeps it out of the step where
        it could wait on a peer that is itself waiting. It also proves every link works.
        """
        me = self.groups.pipeline_rank
        for src in range(self.groups.pp):
            for dst in range(self.groups.pp):
                if me in (src, dst) and src != dst:
                    if me == src:
                        self.send(None, dst, 0, what="connect")
                        self.flush()
                    else:
                        self.expect(src, [(0, "connect", None)])
                        self.recv(src, 0, what="connect")
