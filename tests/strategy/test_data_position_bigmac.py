"""The data position through BigMacStrategy's own checkpoint: two processes, a fit stopped at
``max_steps``, its checkpoint, and a resumed fit that trains exactly the steps that follow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from balancer import BalancedBatchSampler
from tests.strategy.balanced_steps import CONFIG, samples
from tests.strategy.test_strategy_training import HERE, run


@pytest.mark.slow
def test_bigmac_checkpoint_carries_the_data_position(tmp_path: Path) -> None:
    out = tmp_path / "keys.json"
    cmd = [sys.executable, str(HERE / "run_balanced.py"), "--ckpt", str(tmp_path / "ckpt"), "--stop", "3"]
    proc = run([*cmd, "--steps", "9", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())

    sampler = BalancedBatchSampler(samples(), CONFIG)  # one data-parallel replica: P=2 on two processes
    epoch0 = list(sampler)
    expected = [[s.epoch, s.step, [list(mb) for mb in s.keys]] for s in (*epoch0, *sampler)][:9]
    assert len(epoch0) < 9  # the resumed fit runs into epoch 1
    assert got["first"] == expected[:3]
    assert got["rest"] == expected[3:]
