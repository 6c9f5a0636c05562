"""A rank that dies or stops answering mid-step makes every survivor fail, naming it, within the timeout."""

from __future__ import annotations

import re

import pytest

from lightning_bigmac.testing.scenarios import fail_mid_step
from lightning_bigmac.testing.spawn import launch

TIMEOUT = 3.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_survivor_fails_naming_the_lost_rank(mode: str) -> None:
    victim = 1
    outcomes = launch(fail_mid_step, 2, victim, mode, TIMEOUT, timeout=30.0, join_timeout=60.0)
    dead = outcomes[victim]
    assert dead.exitcode == (-9 if mode == "kill" else 0), dead
    for o in outcomes:
        if o.rank == victim:
            continue
        assert o.exitcode not in (0, None), o
        assert o.error is not None and "PeerError" in o.error, o.error
        first = o.error.splitlines()[0]
        assert f"rank {victim}" in first, first
        if mode == "hang":
            assert "within 3s (peer lost?)" in first, first
        elapsed = float(re.search(r"elapsed ([0-9.]+)s", o.error).group(1))
        assert elapsed < 2 * TIMEOUT, (elapsed, first)  # bounded by the configured timeout, not a hang
        print(mode, first, f"after {elapsed:.2f}s")
