"""RunReport (the run folder) in one process, StepProfile's files, and the measured-step simulation.

The BigMac side of RunReport (a profiled step, sharded final checkpoint, consolidation) runs in
``tests/examples/test_main_job.py`` through the main job itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_bigmac import Microbatches, RunReport
from lightning_bigmac.run_report import count_samples
from lightning_bigmac.runtime import OpEvent, measured_simulation
from lightning_bigmac.schedule import OpCosts, build_plan, simulate
from lightning_bigmac.step_report import StepProfile
from lightning_bigmac.testing.tiny_module import TinyDataModule, TinyMLLMModule


def test_count_samples_reads_keys_of_packed_microbatches_else_the_leading_dimension() -> None:
    packed = Microbatches(
        [{"keys": ("a", "b", "c"), "x": torch.zeros(9)}, {"keys": ("d",), "x": torch.zeros(2)}]
    )
    assert count_samples(packed) == 4
    assert count_samples({"tokens": torch.zeros(5, 7), "labels": torch.zeros(5, 7)}) == 5
    assert count_samples(Microbatches([{"tokens": torch.zeros(3, 2)}, {"tokens": torch.zeros(2, 2)}])) == 5


def test_run_report_writes_the_run_folder_under_any_strategy(tmp_path: Path) -> None:
    report = RunReport(profile_step=1)  # no BigMacStrategy: nothing to profile, the rest still holds
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=4, val_check_interval=2, default_root_dir=tmp_path,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[report],
    )  # fmt: skip
    trainer.fit(TinyMLLMModule(layers=2), TinyDataModule(steps=4, microbatches=2, val_steps=1))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [step for step, _ in metrics["train_loss"]] == [1, 2, 3, 4]
    assert [row["step"] for row in metrics["val"]] == [2, 4]
    assert metrics["samples"] > 0 and metrics["samples_per_s"] > 0
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert not (tmp_path / "profile").exists()
    trained = TinyMLLMModule.load_from_checkpoint(tmp_path / "consolidated.ckpt")
    live = trainer.lightning_module.state_dict()
    assert all(torch.equal(v, live[k]) for k, v in trained.state_dict().items())


def _profile_of(schedule: str) -> tuple[StepProfile, float]:
    """A StepProfile whose events are a simulated step (as if the runtime had measured it)."""
    plan = build_plan(schedule, pp=2, microbatches=4)
    sim = simulate(plan, OpCosts())
    events = [
        OpEvent(iv.rank, str(iv.op), iv.start * 1e-3, iv.end * 1e-3) for row in sim.intervals for iv in row
    ]
    peaks = [{"encoder": 1000 * (r + 1), "llm": 4000, "generator": 10} for r in range(2)]
    return StepProfile(7, plan, events, peaks, wall=sim.step_time * 1e-3), sim.step_time * 1e-3


def test_measured_simulation_replays_the_events() -> None:
    profile, step_time = _profile_of("bigmac")
    sim = measured_simulation(profile.plan, profile.events)
    assert sim.step_time == pytest.approx(step_time)
    assert sim.peak_live == simulate(profile.plan, OpCosts()).peak_live
    with pytest.raises(ValueError, match="no event for"):
        measured_simulation(profile.plan, profile.events[1:])


def test_step_profile_writes_gantt_trace_costs_and_memory_report(tmp_path: Path) -> None:
    profile, _ = _profile_of("bigmac")
    written = profile.write(tmp_path)
    assert {p.name for p in written} == {
        "gantt.png", "memory.png", "trace.json", "profile.json", "memory.md", "step.json",
    }  # fmt: skip
    assert all(p.stat().st_size > 0 for p in written)
    assert OpCosts.load(tmp_path / "profile.json").measured  # bigmac plan --costs reads it back
    table = (tmp_path / "memory.md").read_text()
    assert "| PP1 | 0.00 |" in table  # 2000 bytes of encoder activations on PP1, in MiB
    step = json.loads((tmp_path / "step.json").read_text())
    assert step["step"] == 7 and step["activation_peak_bytes"][1]["encoder"] == 2000
