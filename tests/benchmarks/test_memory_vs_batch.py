"""memory_vs_batch.py at a tiny size: real 2-process steps, bigmac flat, ideal growing with M."""

from __future__ import annotations

import json
from pathlib import Path

import memory_vs_batch as bench
import pytest


def _peaks(encoder: list[list[int]]) -> bench.Peaks:
    """Peaks of one schedule at M = 4 and 8, given the encoder peak per rank at each."""
    return {
        ("ideal", m): [{"peak": {"encoder": b, "llm": 1, "generator": 1}, "units": {}} for b in row]
        for m, row in zip((4, 8), encoder, strict=True)
    }


def test_growth_is_read_on_the_busiest_rank_at_the_largest_m() -> None:
    peaks = _peaks([[10, 20], [40, 20]])  # rank 1 is heavier at M=4, rank 0 at M=8
    assert bench.busiest_rank(peaks, "ideal", "encoder", 8) == 0
    assert bench.growth(peaks, "ideal", "encoder", 4, 8) == 4.0


@pytest.mark.slow
def test_bigmac_memory_is_flat_and_ideal_grows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = bench.main(["--pp", "2", "--multiples", "4", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == figures
    assert "matches the meter: yes" in out
    assert abs(figures["bigmac_encoder_growth"] - 1) <= 0.05
    assert abs(figures["bigmac_generator_growth"] - 1) <= 0.05
    assert figures["ideal_encoder_growth"] >= 1.9  # M doubles: O(M/P) encoder activations
    assert figures["bigmac_encoder_growth"] < figures["ideal_encoder_growth"]
    assert (tmp_path / "memory_vs_batch.png").stat().st_size > 0
