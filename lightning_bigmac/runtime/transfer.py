"""Point-to-point transfer of pytrees of tensors between pipeline ranks, with shape headers.

Every microbatch may have its own sequence length and image count, so nothing is padded and no
receive buffer is sized in advance: each message is a fixed-size int64 *header* followed by one
payload transfer per non-empty tensor leaf. The header carries, in order::

    [length, tag, num_leaves, spec_bytes,  per leaf: dtype code, requires_grad, ndim, *shape,  spec]

``dtype code`` -1 marks a ``None`` leaf; ``spec`` is the pytree structure
(``torch.utils._pytree.treespec_dumps``) as bytes. A header longer than :data:`HEADER_SLOTS`
continues in a second message. The ``tag`` slot repeats the message's tag so that a receiver
reading a different message than it expects fails loudly on backends that ignore tags (NCCL).

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
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from .groups import PipelineGroups

__all__ = ["HEADER_SLOTS", "PARTS", "PeerError", "Transport"]

HEADER_SLOTS = 256
"""int64 slots of the first header message (2 KiB); longer headers continue in a second one."""
PARTS = 4096
"""Sub-messages per message: header, header overflow and up to ``PARTS - 2`` tensor leaves."""
_MAX_TAG = 2**31 - 1

_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
)
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


class PeerError(RuntimeError):
    """A message from or to a peer did not complete: the peer died or never sent it in time."""


def _encode_header(tag: int, spec: pytree.TreeSpec, leaves: list[Any]) -> list[int]:
    body: list[int] = []
    for leaf in leaves:
        if leaf is None:
            body.append(-1)
            continue
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"only tensors and None can cross a pipeline stage, got a {type(leaf).__name__} leaf; "
                "put Python values into the microbatch instead (every rank receives it)"
            )
        if leaf.dtype not in _CODE:
            raise TypeError(f"dtype {leaf.dtype} cannot cross a pipeline stage; supported: {list(_CODE)}")
        body += [_CODE[leaf.dtype], int(leaf.requires_grad), leaf.dim(), *leaf.shape]
    raw = pytree.treespec_dumps(spec).encode()
    words = np.frombuffer(raw + b"\0" * (-len(raw) % 8), dtype=np.int64).tolist()
    header = [0, tag, len(leaves), len(raw), *body, *words]
    header[0] = len(header)
    return header


def _decode_header(
    header: list[int],
) -> tuple[pytree.TreeSpec, list[tuple[torch.dtype, bool, list[int]] | None]]:
    num_leaves, spec_bytes = header[2], header[3]
    pos, metas = 4, []
    for _ in range(num_leaves):
        code = header[pos]
        if code < 0:
            metas.append(None)
            pos += 1
            continue
        ndim = header[pos + 2]
        metas.append((_DTYPES[code], bool(header[pos + 1]), header[pos + 3 : pos + 3 + ndim]))
        pos += 3 + ndim
    raw = np.asarray(header[pos:], dtype=np.int64).tobytes()[:spec_bytes]
    return pytree.treespec_loads(raw.decode()), metas


@dataclass(eq=False)
class _Incoming:
    """A message being received: its header (``stage`` "header", then "rest" if it overflows),
    then its payload ("payload"); ``works`` are the receives the current stage waits on."""

    tag: int
    what: str
    buf: torch.Tensor
    stage: str = "header"
    works: list[dist.Work] = field(default_factory=list)
    header: list[int] = field(default_factory=list)
    spec: Any = None
    metas: list[Any] = field(default_factory=list)
    leaves: list[torch.Tensor | None] = field(default_factory=list)


class Transport:
    """Sends and receives pytrees between the ranks of one pipeline (pipeline ranks as addresses).

    ``device`` is where payloads live: CPU for gloo, the rank's GPU for NCCL (headers too, since
    NCCL moves only device tensors). ``timeout`` (seconds) bounds every wait. ``match_by_order``
    puts tag 0 on the wire so gloo pairs messages by posting order alone, as NCCL does: tests use
    it to prove on CPU that the receive order is right for NCCL (the header still carries the tag
    and is checked).
    """

    def __init__(
        self,
        groups: PipelineGroups,
        *,
        device: torch.device | str = "cpu",
        timeout: float = 300.0,
        match_by_order: bool = False,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.groups = groups
        self.device = torch.device(device)
        self.timeout = float(timeout)
        self.match_by_order = match_by_order
        self._pending: list[tuple[dist.Work, list[torch.Tensor], int, str]] = []
        self._poll = dist.get_backend(groups.pipeline_group) != "gloo"
        self._queue: dict[int, deque[tuple[int, str]]] = {}
        self._inflight: dict[int, deque[_Incoming]] = {}
        self._done: dict[int, dict[int, Any]] = {}

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
    def send(self, tree: Any, dst: int, tag: int, *, what: str) -> None:
        """Post the sends of ``tree`` to pipeline rank ``dst`` and return at once.

        Tensors are sent detached; ``requires_grad`` travels in the header so the receiver can
        make its copy a leaf of its own graph. ``what`` (the consuming op) names the message in errors.
        """
        leaves, spec = pytree.tree_flatten(tree)
        if len(leaves) > PARTS - 2:
            raise ValueError(f"{what}: {len(leaves)} tensors cross the stage but at most {PARTS - 2} may")
        header = _encode_header(tag, spec, leaves)
        group, peer = self.groups.channels[(self.groups.pipeline_rank, dst)], self._peer(dst)
        first = torch.zeros(HEADER_SLOTS, dtype=torch.int64)
        head = torch.tensor(header, dtype=torch.int64)
        first[: min(len(header), HEADER_SLOTS)] = head[:HEADER_SLOTS]
        bufs = [first.to(self.device)]
        if len(header) > HEADER_SLOTS:
            bufs.append(head[HEADER_SLOTS:].to(self.device))
        for leaf in leaves:
            if leaf is not None and leaf.numel() > 0:
                bufs.append(leaf.detach().contiguous())
        for part, buf in enumerate(bufs):
            sub = self._sub_tag(tag, part)
            self._pending.append((dist.isend(buf, dst=peer, group=group, tag=sub), [buf], dst, what))
        self._prune()

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
    def expect(self, src: int, messages: Iterable[tuple[int, str]]) -> None:
        """Announce the messages ``(tag, what)`` that ``src`` will send, in its posting order.

        The first header receive is posted at once and every later one as soon as the previous
        message's payload receives are posted, so transfers progress while this rank computes
        (see :meth:`poll`) and the receive order on the channel is the sender's order.
        """
        self._queue[src] = deque(messages)
        self._inflight.setdefault(src, deque())
        self._done.setdefault(src, {})
        if not self._inflight[src]:
            self._post_next(src)

    def _post_next(self, src: int) -> None:
        queue = self._queue.get(src)
        if queue:
            tag, what = queue.popleft()
            msg = _Incoming(tag, what, torch.empty(HEADER_SLOTS, dtype=torch.int64, device=self.device))
            msg.works = [self._irecv(msg.buf, src, tag, 0)]
            self._inflight[src].append(msg)

    def _irecv(self, buf: torch.Tensor, src: int, tag: int, part: int) -> dist.Work:
        group = self.groups.channels[(src, self.groups.pipeline_rank)]
        return dist.irecv(buf, src=self._peer(src), group=group, tag=self._sub_tag(tag, part))

    def _advance(self, src: int, msg: _Incoming, deadline: float | None, needed: str) -> bool:
        """Move ``msg`` one stage on if its pending receives are done (waiting for them when
        ``deadline`` is given); returns whether it moved."""
        what = msg.what if msg.what == needed else f"{msg.what} (read before {needed})"
        for work in msg.works:
            if deadline is None and not work.is_completed():
                return False
            self._wait(work, time.monotonic() + 1.0 if deadline is None else deadline, src, what)
        if msg.stage == "payload":
            for leaf, meta in zip(msg.leaves, msg.metas, strict=True):
                if leaf is not None and meta[1]:
                    leaf.requires_grad_(True)
            self._inflight[src].remove(msg)
            self._done[src][msg.tag] = pytree.tree_unflatten(msg.leaves, msg.spec)
            return True
        if msg.stage == "header":
            msg.header = msg.buf.tolist()
            if msg.header[1] != msg.tag:
                raise RuntimeError(
                    f"rank {self.groups.rank}: expected message {msg.tag} ({what}) from "
                    f"{self._describe(src)} but got {msg.header[1]}: sender and receiver disagree on "
                    "the message order"
                )
            if msg.header[0] > HEADER_SLOTS:
                msg.stage = "rest"
                msg.buf = torch.empty(msg.header[0] - HEADER_SLOTS, dtype=torch.int64, device=self.device)
                msg.works = [self._irecv(msg.buf, src, msg.tag, 1)]
                return True
        else:
            msg.header += msg.buf.tolist()
        msg.spec, msg.metas = _decode_header(msg.header[: msg.header[0]])
        part = 2 if msg.stage == "rest" else 1
        msg.stage, msg.works, msg.leaves = "payload", [], []
        for meta in msg.metas:
            leaf = None if meta is None else torch.empty(meta[2], dtype=meta[0], device=self.device)
            if leaf is not None and leaf.numel() > 0:
                msg.works.append(self._irecv(leaf, src, msg.tag, part))
                part += 1
            msg.leaves.append(leaf)
        self._post_next(src)
        return True

    def poll(self) -> None:
        """Progress every incoming message as far as possible without blocking (call between ops)."""
        for src, inflight in self._inflight.items():
            for msg in list(inflight):
                while msg in inflight and self._advance(src, msg, None, msg.what):
                    pass
        self._prune()

    def recv(self, src: int, tag: int, *, what: str) -> Any:
        """The pytree that pipeline rank ``src`` sent with ``tag`` (announced by :meth:`expect`).

        Blocks up to the timeout, reading ``src``'s earlier messages first when they are not in
        yet. Float leaves the sender had with ``requires_grad`` come back as fresh leaves
        requiring grad.
        """
        deadline = time.monotonic() + self.timeout
        done = self._done.setdefault(src, {})
        while tag not in done:
            inflight = self._inflight.get(src)
            if not inflight:
                raise RuntimeError(
                    f"rank {self.groups.rank}: {what} waits for message {tag} from {self._describe(src)} "
                    "that was never announced with expect()"
                )
            self._advance(src, inflight[0], deadline, what)
        return done.pop(tag)

    def idle(self) -> bool:
        """Whether every announced message was received and handed out."""
        return (
            not any(self._queue.values())
            and not any(self._inflight.values())
            and not any(self._done.values())
        )

    # ---- waiting ----------------------------------------------------------------------------
    def _wait(self, work: dist.Work, deadline: float, peer: int, what: str, sending: bool = False) -> None:
        """Wait for ``work`` until ``deadline``; turn a timeout or a broken connection into PeerError.

        Gloo's ``Work.wait(timeout)`` honours the timeout. NCCL's ``wait`` only orders streams, so
        for it the host polls ``is_completed`` against the deadline.
        """
        me, who = self.groups.rank, self._describe(peer)
        remaining = deadline - time.monotonic()
        try:
            if self._poll:
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    time.sleep(1e-4)
            work.wait(datetime.timedelta(seconds=max(remaining, 1e-3)))
        except Exception as err:
            text = str(err)
            if isinstance(err, TimeoutError) or "Timed out" in text or "timed out" in text:
                problem = f"{who} did not take" if sending else f"no message from {who} for"
                raise PeerError(
                    f"rank {me}: {problem} {what} within {self.timeout:g}s (peer lost?)"
                ) from None
            doing = "sending" if sending else "waiting for"
            raise PeerError(f"rank {me}: lost {who} while {doing} {what}: {text.splitlines()[0]}") from err

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
                        self.expect(src, [(0, "connect")])
                        self.recv(src, 0, what="connect")
