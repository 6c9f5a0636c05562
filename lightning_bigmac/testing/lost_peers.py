"""Runs in which one rank fails on purpose, for the fault tests (via
:func:`~lightning_bigmac.testing.spawn.launch`).

:func:`lose_rank_mid_step` runs on every rank of a ``pp x dp`` layout: a clean step first, so
that start-up is over and every channel is connected, then a step in which one rank is killed,
stopped, or has its own module raise. The victim writes the moment it strikes to a file, so the
test can time how long each survivor takes to give up. :func:`call_after_loss` loses a rank
between steps and makes the calls a step does not: the strategy's collectives and a bare send.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_bigmac.runtime import PeerError, PipelineExecutor, PipelineGroups, Transport
from lightning_bigmac.runtime.collectives import barrier, gather_object
from lightning_bigmac.runtime.receiving import RECEIVING_THREAD
from lightning_bigmac.strategy import BigMacStrategy

from .faults import SIGNALS
from .scenarios import build_case_plan, case_microbatches
from .tiny_mllm import TinyMLLM

__all__ = ["CALLS", "FAULT_FILE", "HOW", "STILL_RECEIVING", "call_after_loss", "lose_rank_mid_step"]

FAULT_FILE = "fault"
"""Name of the file in the run's folder where the victim writes ``time.time()`` as it strikes."""
HOW = ("kill", "stop", "raise")
"""SIGKILL, SIGSTOP (the launcher kills it later), or a ValueError from its own LLM block."""
STILL_RECEIVING = "receiving threads still running:"
"""Starts the note a failed rank adds to its error: a script would leave them to the interpreter's
teardown, and one that returns from gloo then aborts the process."""
CALLS = ("barrier", "broadcast", "reduce", "gather", "send")
"""What :func:`call_after_loss` tries: the strategy's three collectives, the object gather of the
profiler and of ``full_state_dict``, and a transport send."""


def lose_rank_mid_step(rank: int, pp: int, dp: int, victim: int, how: str, timeout: float, out: str) -> None:
    """Two bigmac steps; in the second, global rank ``victim`` strikes (``how``, see :data:`HOW`)
    at its third LLM block call. Survivors raise (noting :data:`STILL_RECEIVING`); the victim
    raises only with ``"raise"``."""
    if how not in HOW:
        raise ValueError(f"how={how!r}: choose one of {HOW}")
    groups = PipelineGroups.create(pp, dp, timeout=timeout)
    model = TinyMLLM(seed=0)
    ex = PipelineExecutor(model.parts(), groups, timeout=timeout)
    case = {"schedule": "bigmac", "microbatches": 2 * pp}
    plan, mbs = build_case_plan(case, pp, 1), case_microbatches(case, groups.dp_rank)
    ex.step(plan, mbs)
    barrier(dist.group.WORLD, ex.watch, "the barrier before the faulty step")
    if rank == victim:
        strike = _striker(how, Path(out) / FAULT_FILE)
        for stage in ex.stages:
            for block in stage.blocks:
                block.register_forward_pre_hook(strike)
    try:
        ex.step(plan, mbs)
    except Exception as err:
        running = [t.name for t in threading.enumerate() if t.name.startswith(RECEIVING_THREAD)]
        err.add_note(f"{STILL_RECEIVING} {running}")
        raise


def _striker(how: str, fault: Path) -> Callable[[torch.nn.Module, Any], None]:
    """A forward pre-hook that strikes at its third call."""
    calls = 0

    def strike(module: torch.nn.Module, args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls != 3:
            return
        fault.write_text(repr(time.time()))
        if how == "raise":
            raise ValueError("a block refused its input")
        os.kill(os.getpid(), SIGNALS[how])

    return strike


def call_after_loss(rank: int, how: str, calls: tuple[str, ...], timeout: float) -> dict[str, Any] | None:
    """P=2 under a :class:`BigMacStrategy` (no Trainer): once both ranks are set up, rank 1 is
    killed or stopped (``how``) and rank 0 makes each of ``calls`` (see :data:`CALLS`) in turn.

    Returns, on rank 0, per call the error it raised (or None) and the seconds until then.
    """
    strategy = BigMacStrategy(
        pipeline_parallel_size=2, timeout=timeout, parallel_devices=[torch.device("cpu")] * 2
    )
    strategy.groups = PipelineGroups.create(2, 1, timeout=timeout)
    transport = Transport(strategy.groups, timeout=timeout)
    transport.connect()
    strategy.barrier("set-up")
    if rank == 1:
        os.kill(os.getpid(), SIGNALS[how])
    time.sleep(0.5)  # time for the loss to reach rank 0's connections
    made = {
        "barrier": lambda: strategy.barrier("after the loss"),
        "broadcast": lambda: strategy.broadcast({"plan": "new"}),
        "reduce": lambda: strategy.reduce(torch.ones(2)),
        "gather": lambda: gather_object({}, 0, None, strategy._watch(), "a gather", torch.device("cpu")),
        "send": lambda: (transport.send(torch.ones(3), 1, 1, what="F1.0"), transport.flush()),
    }
    results: dict[str, Any] = {}
    for call in calls:
        start = time.monotonic()
        try:
            made[call]()
            results[call] = {"error": None, "seconds": time.monotonic() - start}
        except PeerError as err:
            results[call] = {"error": str(err), "seconds": time.monotonic() - start}
    return results
