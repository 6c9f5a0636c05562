"""An exception in the user's module during a step is re-raised naming the rank, the step, the op
and what its microbatch holds, chained to the original; every peer then fails with a PeerError
that tells of it, instead of hanging."""

from __future__ import annotations

import re

import pytest

from lightning_bigmac.testing.lost_peers import FAULT_FILE, STILL_RECEIVING, lose_rank_mid_step
from lightning_bigmac.testing.reliability import record
from lightning_bigmac.testing.spawn import launch

TIMEOUT = 3.0


@pytest.mark.slow
def test_error_in_a_module_names_op_and_microbatch(tmp_path) -> None:
    pp, dp, victim = 2, 2, 3
    outcomes = launch(
        lose_rank_mid_step, pp * dp, pp, dp, victim, "raise", TIMEOUT, str(tmp_path),
        timeout=60.0, join_timeout=120.0, start_method="forkserver",
    )  # fmt: skip
    struck = float((tmp_path / FAULT_FILE).read_text())
    failed = outcomes[victim]
    assert failed.exitcode == 1 and failed.error is not None, failed
    first = failed.error.splitlines()[0]
    assert re.match(
        r"OpError: rank 3, step 1, F\d\.\d \(microbatch \d: images float32\[\d+, 4, 12\], "
        r"tokens int64\[\d+\], .*\): ValueError: a block refused its input$",
        first,
    ), first
    # chained: the original exception and its traceback come first
    assert "ValueError: a block refused its input\n\nThe above exception was the direct cause" in failed.error
    assert f"{STILL_RECEIVING} []" in failed.error, failed.error
    op = first.split(", ")[2].split(" ")[0]
    after = {}
    for o in outcomes:
        if o.rank == victim:
            continue
        assert o.exitcode == 1 and o.error is not None, o
        peer_first = o.error.splitlines()[0]
        assert peer_first.startswith(f"PeerError: rank {o.rank}, step 1: "), peer_first
        assert f"rank 3 raised ValueError: a block refused its input in {op} (microbatch" in peer_first
        after[o.rank] = o.ended - struck
    assert max(after.values()) < TIMEOUT / 2, after  # the failed rank closed its connections at once
    record(
        "A user's module raises mid-step, P=2 x D=2",
        f"OpError on its rank naming the op ({op}) and the microbatch's tensors, chained to the "
        "original; every peer exits 1 with PeerError quoting it",
        measured=", ".join(f"rank {r} {t:.2f} s" for r, t in after.items()) + " after the exception",
    )
