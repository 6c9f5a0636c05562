"""How a rank that lost a peer finds the rank that failed first (beacons, in one process), and the
process groups' timeout. The multi-process faults themselves are in tests/faults."""

from __future__ import annotations

import socket

import pytest

from lightning_bigmac.runtime.beacon import Beacon
from lightning_bigmac.runtime.watch import Lost, PeerWatch
from lightning_bigmac.testing.scenarios import group_timeouts
from lightning_bigmac.testing.spawn import run

TIMEOUT = 1.5


def _beacons(n: int) -> list[Beacon]:
    beacons = [Beacon(rank, "127.0.0.1") for rank in range(n)]
    for b in beacons:
        b.addresses = {other.rank: other.address for other in beacons}
    return beacons


def _silent() -> socket.socket:
    """A stopped process's beacon: the kernel accepts connections, nobody answers."""
    return socket.create_server(("127.0.0.1", 0))


def _gone() -> tuple[str, int]:
    """The address of a process that has exited: nobody listens there any more."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()


def test_waits_are_followed_to_the_rank_that_does_not_answer() -> None:
    b0, b1 = _beacons(2)
    stopped = _silent()
    for b in (b0, b1):
        b.addresses[2] = stopped.getsockname()
    b1.blocked_on = ((2,), "G.3")  # rank 1 is alive but waits for rank 2
    err = PeerWatch(0, TIMEOUT, b0).failure(Lost((1,), "no message from rank 1 for B0.3 within 1.5s"))
    assert str(err) == (
        "rank 0: no message from rank 1 for B0.3 within 1.5s: rank 2 does not answer (stopped or hung)"
    )
    assert b1.notes[0] == {2: "rank 2 does not answer (stopped or hung)"}  # told before giving up


def test_a_failed_rank_s_note_names_the_rank_it_lost() -> None:
    (b0,) = _beacons(1)
    b0.addresses[1] = _gone()
    b0.notes[1] = {3: "rank 3 is gone (killed or crashed)"}
    watch = PeerWatch(0, TIMEOUT, b0)
    watch.step = 4
    err = watch.failure(Lost((1,), "lost rank 1 while waiting for F0.2"))
    assert str(err) == (
        "rank 0, step 4: lost rank 1 while waiting for F0.2: "
        "rank 3 is gone (killed or crashed), as rank 1 found"
    )


def test_a_rank_gone_without_a_note_is_the_one_named() -> None:
    (b0,) = _beacons(1)
    b0.addresses[1] = _gone()
    err = PeerWatch(0, TIMEOUT, b0).failure(Lost((1,), "lost a peer in a barrier over ranks [0, 1]"))
    assert str(err).endswith(": rank 1 is gone (killed or crashed)")


def test_peers_that_all_answer_point_at_the_timeout() -> None:
    b0, b1 = _beacons(2)
    err = PeerWatch(0, TIMEOUT, b0).failure(Lost((1,), "no message from rank 1 for F0.1 within 1.5s"))
    assert "every rank it waited on is alive" in str(err)
    assert b1.notes[0] == {0: "rank 0 gave up: no message from rank 1 for F0.1 within 1.5s"}


@pytest.mark.slow
def test_every_group_gets_the_runtime_s_timeout() -> None:
    for timeouts in run(group_timeouts, 4, 2, 2, 5.0, start_method="forkserver"):
        assert timeouts and set(timeouts) == {5.0}, timeouts  # torch's default would be 1800 s
