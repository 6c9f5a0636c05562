"""Run a function on ``world_size`` fresh processes joined by a gloo process group, collect results.

Tests pay process start-up (~2-3 s on two cores) once per layout and run many steps inside,
so the worker function gets the whole scenario. Each process writes its return value (or its
error text) to a file; :func:`launch` reports every rank's exit code, result and error, which
lets the failure tests see ranks that die on purpose.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
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


def _worker(rank: int, world: int, port: int, timeout: float, out: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    path = Path(out) / f"{rank}.pt"
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
        )
        result = fn(rank, *args)
        torch.save({"result": result}, path)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:  # report everything, then die without waiting on dead peers
        torch.save({"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"}, path)
        os._exit(1)


def launch(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0, join_timeout: float = 600.0
) -> list[RankOutcome]:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned processes; never raises for a failed rank.

    ``fn`` must be importable (a module-level function). ``timeout`` is the process group's
    timeout; ``join_timeout`` bounds the whole run (stragglers are killed and reported).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, timeout, out, fn, args))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=join_timeout)
        for p in procs:
            p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        outcomes = []
        for r, p in enumerate(procs):
            path = Path(out) / f"{r}.pt"
            data = torch.load(path, weights_only=False) if path.exists() else {}
            outcomes.append(RankOutcome(r, p.exitcode, data.get("result"), data.get("error")))
    return outcomes


def run(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Like :func:`launch` but every rank must succeed; returns the results by rank."""
    outcomes = launch(fn, world_size, *args, **kwargs)
    failed = [o for o in outcomes if o.exitcode != 0 or o.error]
    if failed:
        raise RuntimeError(
            "\n".join(f"rank {o.rank} exited with {o.exitcode}: {o.error or '(no report)'}" for o in failed)
        )
    return [o.result for o in outcomes]
