"""Each rank's beacon: a tiny TCP service through which a rank that lost a peer finds the rank
that failed first.

Why: gloo reports a lost peer as an address, NCCL not at all, and a receive or a collective that
times out cannot tell a dead peer from one that is alive but itself waits for somebody else. So
every rank serves two requests from its peers, on a daemon thread:

* *ask*, "what are you waiting for?": the ranks and the op this rank's main thread is blocked on,
  or nothing while it computes. A killed rank refuses the connection; a stopped one accepts it
  (the kernel does) but never answers. Following the answers from rank to rank leads to the one
  at the root of a chain of waits.
* *note*, "I give up, because of ...": a rank that fails leaves its diagnosis with every peer
  before it exits, so that those who then lose *it* name the rank it lost rather than itself.

Addresses are exchanged once, by one ``all_gather_object`` over the world when the beacon
starts. The beacon never raises into a step: it only adds detail to an error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["Beacon", "Reply"]

GONE = "gone"
"""The peer refused the connection: its process has ended."""
SILENT = "silent"
"""The peer accepted the connection but did not answer in time: stopped or hung."""
_BATCH = 256


@dataclass(frozen=True)
class Reply:
    """What a peer's beacon said (``state`` ``"waiting"``), or that it could not (:data:`GONE`,
    :data:`SILENT`)."""

    state: str
    waits_for: tuple[int, ...] = ()
    """Global ranks the peer's main thread is blocked on (empty while it computes)."""
    what: str = ""


class Beacon:
    """This rank's beacon and the address book of everybody else's (see the module docstring).

    Create it with :meth:`start`, a collective over the world. :attr:`blocked_on` is set by the
    main thread around every blocking wait; :attr:`notes` holds the diagnoses peers left, by rank.
    """

    def __init__(self, rank: int, host: str) -> None:
        self.rank = rank
        self._server = socket.create_server((host, 0))  # only the interface the peers reach
        self.address = (host, self._server.getsockname()[1])
        self.addresses: dict[int, tuple[str, int]] = {}
        self.blocked_on: tuple[tuple[int, ...], str] | None = None
        self.notes: dict[int, dict[int, str]] = {}
        threading.Thread(target=self._serve, name="bigmac-beacon", daemon=True).start()

    @classmethod
    def start(cls) -> Beacon | None:
        """Start this rank's beacon and learn every rank's address (all ranks must call it).

        None where this rank cannot listen: its errors then name only the peers it waited on, and
        its peers learn nothing from it.
        """
        try:
            beacon: Beacon | None = cls(dist.get_rank(), _reachable_host())
        except OSError:
            beacon = None
        everyone: list[tuple[str, int] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, beacon.address if beacon is not None else None)
        if beacon is not None:
            beacon.addresses = {r: tuple(a) for r, a in enumerate(everyone) if a is not None}
        return beacon

    # ---- serving ----------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(1.0)
                try:
                    request = json.loads(_read_line(conn))
                    if "note" in request:
                        self.notes[int(request["rank"])] = {int(r): t for r, t in request["note"]}
                        answer: dict = {"ok": True}
                    else:
                        blocked = self.blocked_on
                        answer = {"waits_for": list(blocked[0]), "what": blocked[1]} if blocked else {}
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except (OSError, ValueError, KeyError, TypeError):
                    continue

    # ---- asking -----------------------------------------------------------------------------
    def ask(self, ranks: Iterable[int], wait: float) -> dict[int, Reply]:
        """Ask every rank of ``ranks`` at once what it waits for; unanswered after ``wait`` s: silent.
        Ranks without a beacon are left out."""
        raw = self._exchange(ranks, {"ask": True}, wait)
        return {
            r: Reply(a)
            if isinstance(a, str)
            else Reply("waiting", tuple(a.get("waits_for", ())), a.get("what", ""))
            for r, a in raw.items()
        }

    def tell(self, ranks: Iterable[int], note: dict[int, str], wait: float) -> None:
        """Leave ``note`` (root rank -> what happened to it) with ``ranks``, waiting up to ``wait``
        s for their receipts, so that it is there before this process's connections close."""
        self._exchange(ranks, {"rank": self.rank, "note": sorted(note.items())}, wait)

    def _exchange(self, ranks: Iterable[int], request: dict, wait: float) -> dict[int, dict | str]:
        """Send ``request`` to the beacons of ``ranks``, :data:`_BATCH` at once (file descriptors
        are few); each one's answer, :data:`GONE` or :data:`SILENT`."""
        todo = [r for r in dict.fromkeys(ranks) if r != self.rank and r in self.addresses]
        payload = json.dumps(request).encode() + b"\n"
        answers: dict[int, dict | str] = {}
        for start in range(0, len(todo), _BATCH):
            answers.update(self._exchange_batch(todo[start : start + _BATCH], payload, wait))
        return answers

    def _exchange_batch(self, ranks: list[int], payload: bytes, wait: float) -> dict[int, dict | str]:
        answers: dict[int, dict | str] = {}
        with selectors.DefaultSelector() as sel:
            for r in ranks:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                if sock.connect_ex(self.addresses[r]) not in (0, errno.EINPROGRESS):
                    answers[r] = GONE
                    sock.close()
                    continue
                sel.register(sock, selectors.EVENT_WRITE, [r, b""])
            deadline = time.monotonic() + wait
            while sel.get_map() and (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    answer = _progress(sel, key, payload)
                    if answer is not None:
                        answers[key.data[0]] = answer
            for key in list(sel.get_map().values()):
                answers[key.data[0]] = SILENT
                sel.unregister(key.fileobj)
                key.fileobj.close()
        return answers


def _progress(sel: selectors.BaseSelector, key: selectors.SelectorKey, payload: bytes) -> dict | str | None:
    """One step of one exchange: send the request once connected, then read the answer line.
    Returns the answer when the exchange ended (and closes the socket), else None."""
    sock: socket.socket = key.fileobj  # type: ignore[assignment]
    rank, got = key.data
    answer: dict | str | None = None
    try:
        if key.events & selectors.EVENT_WRITE:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                answer = GONE
            else:
                sock.send(payload)
                sel.modify(sock, selectors.EVENT_READ, [rank, b""])
                return None
        else:
            chunk = sock.recv(65536)
            got += chunk
            key.data[1] = got
            if b"\n" in got:
                line = json.loads(got.split(b"\n", 1)[0])
                answer = line if isinstance(line, dict) else {}
            elif not chunk:
                answer = GONE
    except (OSError, ValueError):
        answer = GONE
    if answer is not None:
        sel.unregister(sock)
        sock.close()
    return answer


def _read_line(conn: socket.socket) -> bytes:
    got = b""
    while b"\n" not in got:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("connection closed mid-request")
        got += chunk
    return got.split(b"\n", 1)[0]


def _reachable_host() -> str:
    """This host's address as the other ranks reach it: the interface towards the rendezvous
    host (``MASTER_ADDR``), else the host name's address, else loopback."""
    master = os.environ.get("MASTER_ADDR")
    with contextlib.suppress(OSError):
        if master:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((master, 1))
                return probe.getsockname()[0]
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"
