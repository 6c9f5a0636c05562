"""A rank lost in the middle of a checkpoint save, killed (SIGKILL) or stopped (SIGSTOP), makes every
survivor exit non-zero within twice the timeout with a PeerError that names the lost rank and the
save; the checkpoint the save was overwriting still holds the last complete save.

The victim strikes after writing its tensors, inside DCP's collectives, in the save that overwrites
``last.ckpt`` (:mod:`lightning_bigmac.testing.lost_in_save`). The matrix runs blocking saves; two
cases run Lightning's ``AsyncCheckpointIO`` (``dcp.async_save`` in a background thread), where the
survivor learns of the loss when it waits for the save. That ``last.ckpt`` then resumes bitwise is
shown end to end by tests/strategy/test_checkpoints.py (same fault, P=2); here its content is
checked against the complete save it came from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_bigmac.checkpoint.sharded import read_full
from lightning_bigmac.testing.lost_in_save import CHECKPOINTS, FAULT_FILE, lose_rank_in_save
from lightning_bigmac.testing.reliability import record
from lightning_bigmac.testing.spawn import launch

TIMEOUT = 3.0
SIGNAL = {"kill": "SIGKILL", "stop": "SIGSTOP"}
NAMED = {"kill": "is gone (killed or crashed)", "stop": "does not answer (stopped or hung)"}
LAYOUTS = [(2, 1), (4, 1), (2, 2)]
CASES = [
    pytest.param(pp, dp, victim, how, False, id=f"P{pp}xD{dp}-rank{victim}-{how}")
    for pp, dp in LAYOUTS
    for victim in (0, pp * dp - 1)
    for how in ("kill", "stop")
] + [
    pytest.param(2, 1, 1, "kill", True, id="background-P2xD1-rank1-kill"),
    pytest.param(2, 2, 0, "stop", True, id="background-P2xD2-rank0-stop"),
]


def _layout(pp: int, dp: int) -> str:
    return f"P={pp}" if dp == 1 else f"P={pp} x D={dp}"


def _tensors(tree: object) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint dict, by its path."""
    found: dict[str, torch.Tensor] = {}

    def walk(x: object, path: str) -> None:
        if isinstance(x, torch.Tensor):
            found[path] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}/{k}")
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")

    walk(tree, "")
    return found


def assert_holds_the_complete_save(ckpt: Path) -> None:
    """``last.ckpt`` loads and equals, bitwise, the epoch-0 save it was written with (every parameter
    and optimizer state): the interrupted overwrite left it alone."""
    last, complete = read_full(ckpt / "last.ckpt"), read_full(ckpt / "epoch=0-step=1.ckpt")
    assert last["global_step"] == complete["global_step"] == 1
    got, want = _tensors(last), _tensors(complete)
    assert got.keys() == want.keys() and any("optimizer_states" in k for k in got)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


@pytest.mark.slow
@pytest.mark.parametrize(("pp", "dp", "victim", "how", "background"), CASES)
def test_survivors_of_a_save_name_the_lost_rank(
    pp: int, dp: int, victim: int, how: str, background: bool, tmp_path: Path
) -> None:
    survivors = [r for r in range(pp * dp) if r != victim]
    outcomes = launch(
        lose_rank_in_save, pp * dp, pp, dp, victim, how, TIMEOUT, str(tmp_path), background,
        timeout=TIMEOUT, join_timeout=120.0, wait_for=survivors, start_method="forkserver",
    )  # fmt: skip
    struck = float((tmp_path / FAULT_FILE).read_text())
    after = {}
    for o in (outcomes[r] for r in survivors):
        assert o.exitcode == 1 and o.error is not None, o  # a negative exit code would be a signal (abort)
        first = o.error.splitlines()[0]
        assert first.startswith(f"PeerError: rank {o.rank}, step 1: lost a peer while saving "), first
        assert first.split(": ")[2].endswith("last.ckpt"), first  # names the save's path
        assert f"rank {victim} {NAMED[how]}" in first, first
        after[o.rank] = o.ended - struck
    assert max(after.values()) < 2 * TIMEOUT, after
    assert_holds_the_complete_save(tmp_path / CHECKPOINTS)
    where = "first" if victim == 0 else "last"
    kind = "background" if background else "blocking"
    record(
        f"{SIGNAL[how]} of the {where} rank inside a {kind} save overwriting last.ckpt, {_layout(pp, dp)}",
        f'every survivor exits 1 with PeerError "... lost a peer while saving .../last.ckpt: rank {victim} '
        f'{NAMED[how]}"; last.ckpt still holds the previous complete save, bitwise',
        section="Checkpoints",
        measured="exit after the fault: "
        + ", ".join(f"rank {r} {t:.2f} s" for r, t in after.items())
        + f"; timeout {TIMEOUT:g} s",
    )
