"""A rank lost in the middle of a step, killed (SIGKILL) or stopped (SIGSTOP), makes every survivor
exit non-zero within twice the timeout with a PeerError that names the lost rank; none aborts.

The survivors of another pipeline (P=2 x D=2) are in the gradient all-reduce when it happens, the
lost rank's pipeline neighbours in a receive or a send; those whose neighbour gave up before them
name the rank it lost, not the neighbour. No survivor may leave a receiving thread inside gloo:
one that returns while the interpreter tears down aborts the process ("terminate called without
an active exception", exit -6). The ranks are forked from a server, which is fast but leaves
without that teardown, so the survivors report the receiving threads still running as they
raise. Every case records its outcome for docs/reliability.md.
"""

from __future__ import annotations

import pytest

from lightning_bigmac.testing.lost_peers import (
    CALLS,
    FAULT_FILE,
    STILL_RECEIVING,
    call_after_loss,
    lose_rank_mid_step,
)
from lightning_bigmac.testing.reliability import record
from lightning_bigmac.testing.spawn import launch

TIMEOUT = 3.0
AT_ONCE = TIMEOUT / 2
"""A killed rank's connections close: survivors must not wait for a timeout, nor for each other's."""
SIGNAL = {"kill": "SIGKILL", "stop": "SIGSTOP"}
NAMED = {"kill": "is gone (killed or crashed)", "stop": "does not answer (stopped or hung)"}
LAYOUTS = [(2, 1), (4, 1), (2, 2)]
CASES = [
    pytest.param(pp, dp, victim, how, id=f"P{pp}xD{dp}-rank{victim}-{how}")
    for pp, dp in LAYOUTS
    for victim in (0, pp * dp - 1)
    for how in ("kill", "stop")
]


def _layout(pp: int, dp: int) -> str:
    return f"P={pp}" if dp == 1 else f"P={pp} x D={dp}"


def _doing(first: str) -> str:
    """What a survivor was doing when it gave up, from its error's first line."""
    kinds = (("all-reduce", "all-reduce"), ("while sending", "send"), ("did not take", "send"))
    return next((kind for key, kind in kinds if key in first), "receive")


@pytest.mark.slow
@pytest.mark.parametrize(("pp", "dp", "victim", "how"), CASES)
def test_survivors_name_the_lost_rank(pp: int, dp: int, victim: int, how: str, tmp_path) -> None:
    world = pp * dp
    survivors = [r for r in range(world) if r != victim]
    outcomes = launch(
        lose_rank_mid_step, world, pp, dp, victim, how, TIMEOUT, str(tmp_path),
        timeout=60.0, join_timeout=120.0, wait_for=survivors, start_method="forkserver",
    )  # fmt: skip
    struck = float((tmp_path / FAULT_FILE).read_text())
    after, firsts = {}, {}
    for o in (outcomes[r] for r in survivors):
        assert o.exitcode == 1 and o.error is not None, o  # a negative exit code would be a signal (abort)
        first = o.error.splitlines()[0]
        assert first.startswith(f"PeerError: rank {o.rank}, step 1: "), first
        assert f"rank {victim} {NAMED[how]}" in first, first
        assert f"{STILL_RECEIVING} []" in o.error, o.error  # none left to abort the teardown
        after[o.rank], firsts[o.rank] = o.ended - struck, first
    assert max(after.values()) < (2 * TIMEOUT if how == "stop" else AT_ONCE), after
    if dp > 1:  # the other pipeline's survivors were in the gradient all-reduce (bounded by the timeout)
        assert any("gradient all-reduce" in f for f in firsts.values()), firsts
    where = "first" if victim == 0 else "last"
    record(
        f"{SIGNAL[how]} of the {where} rank mid-step, {_layout(pp, dp)}",
        f'every survivor exits 1 with PeerError "... rank {victim} {NAMED[how]}", no thread left in gloo',
        measured="exit after the fault: "
        + ", ".join(f"rank {r} {t:.2f} s ({_doing(firsts[r])})" for r, t in after.items())
        + f"; timeout {TIMEOUT:g} s",
    )


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_strategy_collectives_and_sends_name_the_lost_rank(how: str) -> None:
    calls = CALLS if how == "kill" else ("barrier", "send")  # a stopped peer costs a timeout per call
    outcomes = launch(
        call_after_loss, 2, how, calls, TIMEOUT,
        timeout=60.0, join_timeout=120.0, wait_for=[0], start_method="forkserver",
    )  # fmt: skip
    results = outcomes[0].result
    assert outcomes[0].exitcode == 0 and results is not None, outcomes[0]
    for call in calls:
        error, seconds = results[call]["error"], results[call]["seconds"]
        assert error is not None and error.startswith("rank 0: "), (call, error)
        assert f"rank 1 {NAMED[how]}" in error, (call, error)
        assert seconds < 2 * TIMEOUT, (call, seconds)
    for call in calls:
        whats = {"send": "a transport send", "gather": "an object gather (profiler, full state dict)"}
        what = whats.get(call, f"the strategy's {call}")
        record(
            f"{SIGNAL[how]} of a peer, then {what}, P=2",
            f'PeerError "... rank 1 {NAMED[how]}"',
            measured=f"raised after {results[call]['seconds']:.2f} s; timeout {TIMEOUT:g} s",
        )
