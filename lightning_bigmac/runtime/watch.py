"""Bounded waits on peers, and the error that says what failed.

Every blocking call of the runtime (receives, sends, collectives) waits at most the timeout; a
timeout or a broken connection ends in a :class:`~lightning_bigmac.runtime.errors.PeerError`
that names this rank, the step, what it waited for and, through the ranks'
:class:`~lightning_bigmac.runtime.beacon.Beacon` s, the rank that failed first. Without that,
one lost rank makes every survivor report a different neighbour: the next rank of the pipeline
loses the rank that gave up before it, and so on.

Low-level waits raise :class:`Lost`; only the main thread turns it into a PeerError
(:meth:`PeerWatch.failure`), because only it knows the error will be raised: a receiving thread
may time out on a message the step never gets to consume.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable

import torch.distributed as dist

from .beacon import GONE, SILENT, Beacon
from .errors import OpError, PeerError

__all__ = ["DEFAULT_TIMEOUT", "Lost", "PeerWatch", "finish"]


DEFAULT_TIMEOUT = 300.0
"""Seconds a rank waits for a peer unless told otherwise (``BigMacStrategy(timeout=...)``)."""


class Lost(Exception):
    """A wait on ``peers`` (global ranks) failed: ``summary`` says how, ``cause`` is the backend's error."""

    def __init__(self, peers: Iterable[int], summary: str, cause: BaseException | None = None) -> None:
        super().__init__(summary)
        self.peers, self.summary, self.cause = tuple(peers), summary, cause


def finish(work: dist.Work, deadline: float, gloo: bool) -> None:
    """Wait for ``work`` until ``deadline`` (``time.monotonic``); TimeoutError if it is not done
    by then, the backend's error if it failed.

    Gloo's ``Work.wait(timeout)`` honours the timeout. NCCL's ``wait`` only orders streams, so
    for it the host polls ``is_completed`` against the deadline.
    """
    remaining = deadline - time.monotonic()
    if not gloo:
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(1e-4)
    try:
        work.wait(datetime.timedelta(seconds=max(remaining, 1e-3)))
    except RuntimeError as err:
        if "timed out" in str(err).lower():
            raise TimeoutError from err
        raise


class PeerWatch:
    """How long this rank waits for its peers, which step it is in, and what it tells when one fails.

    ``beacon`` (optional) finds the rank that failed first; without one an error names only the
    peer or group this rank waited on. The executor sets :attr:`step`.
    """

    def __init__(self, rank: int, timeout: float, beacon: Beacon | None = None) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.rank, self.timeout, self.beacon = rank, float(timeout), beacon
        self.step: int | None = None
        """The step being run (the executor's count, from 0), named in errors."""
        self.probe_wait = min(max(self.timeout / 5, 0.5), 5.0)  # a lost rank is named within 2 x timeout
        """Seconds a live beacon has to answer: short enough that a survivor stops well within
        twice the timeout, long enough for a busy host to schedule the beacon's thread."""

    def deadline(self) -> float:
        return time.monotonic() + self.timeout

    def where(self) -> str:
        """``rank 3, step 7``: how every error of this rank starts."""
        return f"rank {self.rank}" if self.step is None else f"rank {self.rank}, step {self.step}"

    def blocked(self, peers: tuple[int, ...], what: str) -> None:
        """The main thread is about to block on ``peers`` for ``what`` (peers asking learn it)."""
        if self.beacon is not None:
            self.beacon.blocked_on = (peers, what)

    def unblocked(self) -> None:
        if self.beacon is not None:
            self.beacon.blocked_on = None

    # ---- errors -------------------------------------------------------------------------------
    def failure(self, lost: Lost) -> PeerError:
        """The PeerError for ``lost``, with the rank(s) that failed first; leaves that diagnosis
        with every peer before this rank goes down (see :mod:`.beacon`)."""
        roots, found_by = self._diagnose(lost.peers)
        text = f"{self.where()}: {lost.summary}"
        if roots:
            told = {r: f", as rank {found_by[r]} found" if r in found_by else "" for r in roots}
            text += ": " + "; ".join(why + told[r] for r, why in roots.items())
        elif self.beacon is not None:
            text += ": every rank it waited on is alive (a slow peer, or too short a timeout?)"
            roots = {self.rank: f"rank {self.rank} gave up: {lost.summary}"}
        self._tell(roots)
        return PeerError(text)

    def op_failed(self, where: str, err: BaseException) -> OpError:
        """The OpError for the user's exception ``err`` in ``where`` (an op and its microbatch);
        the peers learn that this rank failed, not a peer of it."""
        summary = f"{type(err).__name__}: {err}".splitlines()[0]
        self._tell({self.rank: f"rank {self.rank} raised {summary} in {where}"})
        return OpError(f"{self.where()}, {where}: {summary}")

    def _diagnose(self, suspects: tuple[int, ...]) -> tuple[dict[int, str], dict[int, int]]:
        """Follow waits from ``suspects`` to the ranks that are gone, silent or failed: what
        happened to each, by rank, and for those a failed peer's note told of, that peer."""
        if self.beacon is None:
            return {}, {}
        roots: dict[int, str] = {}
        found_by: dict[int, int] = {}
        seen = {self.rank}
        frontier = [r for r in dict.fromkeys(suspects) if r not in seen]
        while frontier:
            seen.update(frontier)
            replies = self.beacon.ask(frontier, self.probe_wait)
            after = []
            for r in frontier:
                note, reply = self.beacon.notes.get(r), replies.get(r)
                if note is not None:  # it failed and said why
                    for root, why in note.items():
                        if root != self.rank and root not in roots:
                            roots[root] = why
                            if root != r:
                                found_by[root] = r
                elif reply is None:  # no beacon there: nothing to learn
                    continue
                elif reply.state == GONE:
                    roots.setdefault(r, f"rank {r} is gone (killed or crashed)")
                elif reply.state == SILENT:
                    roots.setdefault(r, f"rank {r} does not answer (stopped or hung)")
                else:
                    after += [w for w in reply.waits_for if w not in seen]
            frontier = list(dict.fromkeys(after))
        return roots, found_by

    def _tell(self, roots: dict[int, str]) -> None:
        """Leave ``roots`` with every other rank but the failed ones (a stopped rank would never
        give a receipt)."""
        if self.beacon is not None:
            others = [r for r in self.beacon.addresses if r != self.rank and r not in roots]
            self.beacon.tell(others, roots, self.probe_wait)
