"""The main job (``examples/mllm/train.py`` + ``examples/configs/``), its run folder, and the configs.

The full job is the README's first command (minutes); here the same command runs a few steps on a
tiny data cache, which exercises everything the run folder promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from examples.mllm import ExampleMLLM
from examples.mllm.data import ExampleDataModule
from examples.mllm.train import ExampleCLI
from lightning_bigmac.testing.spawn import child_env

ROOT = Path(__file__).parent.parent.parent
CONFIGS = ROOT / "examples" / "configs"
HANG_GUARD = 900  # seconds: a deadlocked run fails instead of stalling CI (not a performance limit)


def _parse(capsys: pytest.CaptureFixture, *configs: Path) -> dict:
    """The merged config as the CLI sees it (``--print_config``: parsed, nothing instantiated)."""
    args = [a for c in configs for a in ("--config", str(c))]
    with pytest.raises(SystemExit) as done:
        ExampleCLI(ExampleMLLM, ExampleDataModule, run=False, args=[*args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    "schedule", ["gpipe", "1f1b", "interleaved", "megatron", "ideal", "bigmac", "bigmac_zb"]
)
def test_schedule_configs_layer_over_the_cpu_config(schedule: str, capsys: pytest.CaptureFixture) -> None:
    cfg = _parse(capsys, CONFIGS / "mllm_cpu.yaml", CONFIGS / "schedules" / f"{schedule}.yaml")
    strategy = cfg["trainer"]["strategy"]["init_args"]
    assert strategy["schedule"] == schedule
    assert strategy["pipeline_parallel_size"] == 2  # kept from the CPU config
    assert strategy["virtual_chunks"] == (2 if schedule == "interleaved" else 1)
    assert cfg["trainer"]["default_root_dir"] == f"runs/mllm-{schedule}"


def test_gpu_config_parses_and_fits_its_layout(capsys: pytest.CaptureFixture) -> None:
    cfg = _parse(capsys, CONFIGS / "mllm_gpu.yaml")
    trainer, strategy = cfg["trainer"], cfg["trainer"]["strategy"]["init_args"]
    world = trainer["devices"] * trainer["num_nodes"]
    pp, vpp = strategy["pipeline_parallel_size"], strategy["virtual_chunks"]
    assert world % pp == 0
    assert cfg["model"]["config"]["layers"] >= pp * vpp
    assert cfg["data"]["config"]["microbatches"] % pp == 0
    assert trainer["precision"] == "bf16-mixed"


def test_cli_links_the_model_geometry_into_the_data_module() -> None:
    cli = ExampleCLI(
        ExampleMLLM, ExampleDataModule, run=False,
        args=["--config", str(CONFIGS / "mllm_cpu.yaml"), "--model.config.patch_size=4",
              "--trainer.strategy=auto", "--trainer.devices=1", "--trainer.callbacks=[]"],
    )  # fmt: skip
    assert cli.datamodule.model.patch_size == 4
    assert cli.model.config.patch_size == 4


def _main_job(run: Path, data_root: str, *extra: str) -> dict:
    """The README's main job on a tiny data cache; returns its JSON summary (the last line)."""
    cmd = [
        sys.executable, "-m", "examples.mllm.train", "--config", str(CONFIGS / "mllm_cpu.yaml"),
        "--trainer.val_check_interval=6", f"--trainer.default_root_dir={run}",
        f"--data.config.root={data_root}", "--data.config.train_samples=120", "--data.config.val_samples=16",
        "--data.config.samples_per_shard=20", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_main_job_fills_the_run_folder_and_resumes(tmp_path: Path, data_root: str) -> None:
    run = tmp_path / "run"
    summary = _main_job(run, data_root, "--trainer.max_steps=12")
    assert summary["steps"] == 12
    assert summary["val_loss_last"] < summary["val_loss_first"]  # 12 steps already lower the loss
    assert summary == json.loads((run / "summary.json").read_text())

    for name in ("loss_curve.png", "metrics.json", "consolidated.ckpt"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "checkpoints" / "final.ckpt" / "meta.pt").exists()  # sharded, complete
    profile = run / "profile"
    for name in ("gantt.png", "memory.png", "trace.json", "profile.json", "memory.md", "step.json"):
        assert (profile / name).stat().st_size > 0, name
    step = json.loads((profile / "step.json").read_text())
    assert step["schedule"] == "bigmac" and step["pp"] == 2
    assert len(step["activation_peak_bytes"]) == 2
    assert all(peak["encoder"] > 0 and peak["llm"] > 0 for peak in step["activation_peak_bytes"])
    trace = json.loads((profile / "trace.json").read_text())
    assert {e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"} == {0, 1}

    metrics = json.loads((run / "metrics.json").read_text())
    assert [s for s, _ in metrics["train_loss"]] == list(range(1, 13))
    assert [v["step"] for v in metrics["val"]] == [0, 6, 12]
    model = ExampleMLLM.load_from_checkpoint(run / "consolidated.ckpt")  # one process, every stage
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # --ckpt_path resumes from the sharded final checkpoint: no step-0 validation, steps 13..18
    resumed = _main_job(
        run, data_root, "--trainer.max_steps=18", f"--ckpt_path={run / 'checkpoints' / 'final.ckpt'}"
    )
    assert resumed["steps"] == 18
    metrics = json.loads((run / "metrics.json").read_text())
    assert [s for s, _ in metrics["train_loss"]] == list(range(13, 19))
    assert [v["step"] for v in metrics["val"]] == [18]
