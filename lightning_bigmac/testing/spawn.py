"""Run a function on ``world_size`` fresh processes joined by a gloo process group, collect results.

Tests pay process start-up (~2-3 s on two cores) once per layout and run many steps inside,
so the worker function gets the whole scenario. Each process writes its return value (or its
error text) to a file; :func:`launch` reports every rank's exit code, result, error and the
moment it exited, which lets the failure tests see ranks that die or stop on purpose and time
how fast the survivors give up. ``start_method="forkserver"`` forks every rank from one server
that imported the worker's module once, instead of paying the imports per process: tests that
launch many short jobs use it.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankOutcome", "child_env", "free_port", "launch", "run"]

_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def child_env() -> dict[str, str]:
    """This process's environment without a rendezvous, for launching a separate distributed job.

    In-process Lightning runs export theirs (``MASTER_PORT``, ranks); a child that inherited them
    would try to join or listen on a port this process still holds.
    """
    return {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RankOutcome:
    rank: int
    exitcode: int | None
    result: Any = None
    error: str | None = None
    ended: float | None = None
    """``time.time()`` when the launcher saw the process exit; None if it had to kill it."""


def _worker(
    rank: int, world: int, port: int, timeout: float, out: str, fn: Callable, args: tuple, linger: bool
) -> None:
    """Run ``fn`` and save what it returned or raised. ``linger``: wait for every rank at the end,
    so that nobody's connections close under a peer still using them; without it (some ranks are
    lost on purpose) leave at once."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    path = Path(out) / f"{rank}.pt"
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
        )
        result = fn(rank, *args)
        torch.save({"result": result}, path)
        if not linger:
            os._exit(0)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:  # report everything, then die without waiting on dead peers
        torch.save({"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"}, path)
        os._exit(1)


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    join_timeout: float = 600.0,
    wait_for: Collection[int] | None = None,
    start_method: str = "spawn",
) -> list[RankOutcome]:
    """Run ``fn(rank, *args)`` on ``world_size`` new processes; never raises for a failed rank.

    ``fn`` must be importable (a module-level function). ``timeout`` is the process group's
    timeout; ``join_timeout`` bounds the whole run (stragglers are killed and reported).
    ``wait_for``: the ranks whose exit ends the run (default all); the others are killed then,
    e.g. a rank stopped on purpose, and no rank waits for the others before it exits.
    ``start_method``: ``"spawn"`` or ``"forkserver"``.
    """
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload([fn.__module__])
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, timeout, out, fn, args, wait_for is None))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        ended = _watch_exits(procs, set(range(world_size) if wait_for is None else wait_for), join_timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        outcomes = []
        for r, p in enumerate(procs):
            path = Path(out) / f"{r}.pt"
            data = torch.load(path, weights_only=False) if path.exists() else {}
            outcomes.append(RankOutcome(r, p.exitcode, data.get("result"), data.get("error"), ended.get(r)))
    return outcomes


def _watch_exits(procs: list, awaited: set[int], join_timeout: float) -> dict[int, float]:
    """``time.time()`` of every process's exit seen until the ``awaited`` ranks all exited or
    ``join_timeout`` passed."""
    deadline = time.monotonic() + join_timeout
    ended: dict[int, float] = {}
    while awaited - ended.keys() and (left := deadline - time.monotonic()) > 0:
        running = {p.sentinel: r for r, p in enumerate(procs) if r not in ended}
        for sentinel in wait(list(running), timeout=left):
            ended[running[sentinel]] = time.time()
    return ended


def run(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Like :func:`launch` but every rank must succeed; returns the results by rank."""
    outcomes = launch(fn, world_size, *args, **kwargs)
    failed = [o for o in outcomes if o.exitcode != 0 or o.error]
    if failed:
        raise RuntimeError(
            "\n".join(f"rank {o.rank} exited with {o.exitcode}: {o.error or '(no report)'}" for o in failed)
        )
    return [o.result for o in outcomes]
