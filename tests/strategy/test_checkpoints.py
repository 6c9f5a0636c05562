"""Checkpoints on DCP: a save that dies leaves the previous checkpoint, any layout resumes any other.

One uninterrupted run (P=2, V=1, D=1, two epochs of five steps, a checkpoint after each epoch and
``last.ckpt`` overwritten after each) is the reference; its step-5 checkpoint resumes at P=4 x V=2,
at P=2 x D=2 and with ``strategy="auto"``, and the losses after resume must equal the
uninterrupted run's (the arithmetic does not depend on the layout; tests/strategy/
test_strategy_training.py checks that for whole runs). A P=2 x D=2 run reads other data than the
reference (each replica its own items), so its reference is one process over both replicas' data
resumed from the consolidated step-5 checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.distributed.checkpoint import FileSystemReader

from lightning_bigmac import BigMacStrategy
from lightning_bigmac.checkpoint import (
    ShardedCheckpointIO,
    consolidate,
    keys,
    optim_by_name,
    owned_state_dict,
)
from lightning_bigmac.checkpoint import files as checkpoint_files
from lightning_bigmac.checkpoint.sharded import read_held
from lightning_bigmac.cli import main as bigmac_cli
from lightning_bigmac.runtime.partition import partition, place
from lightning_bigmac.testing.reliability import record
from lightning_bigmac.testing.tiny_module import TinyDataModule, TinyMLLMModule
from tests.strategy.test_strategy_training import HERE, assert_close_losses, run, run_tiny

STEPS, LAYERS = 5, 8  # P=4 x V=2 needs 8 LLM blocks
COMMON = ["--steps", str(STEPS), "--epochs", "2", "--layers", str(LAYERS)]
P2 = ["--devices", "2", "--pp", "2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted P=2 run and its checkpoints (``losses``, final ``params``, ``val_*``, ``ckpt``),
    saved in the background (``AsyncCheckpointIO``); the killed run below saves blocking."""
    tmp = tmp_path_factory.mktemp("saved")
    ckpt = tmp / "ckpt"
    args = [*P2, *COMMON, "--val-steps", "3", "--ckpt-dir", str(ckpt), "--save-last", "--async-save"]
    full = run_tiny(tmp, "full", *args)
    return {**full, "ckpt": ckpt}


def assert_written_once(ckpt: Path) -> None:
    """Every key is stored once, and the ranks' files hold nothing else: DCP wrote no tensor twice."""
    tensors = checkpoint_files.read_meta(ckpt)["bigmac"]["tensors"]
    metadata = FileSystemReader(tensors).read_metadata()
    stored = [index.fqn for index in metadata.storage_data]
    assert len(stored) == len(set(stored))
    assert any(k.startswith("state_dict.model.encoder.") for k in stored)  # held by every rank
    on_disk = sum(f.stat().st_size for f in tensors.glob("*.distcp"))
    assert on_disk == sum(info.length for info in metadata.storage_data.values())


def fit_in_one_process(ckpt_path: Path, join: int) -> list[float]:
    """Resume the tiny model with ``strategy="auto"`` from ``ckpt_path``: the losses of the steps after it."""
    pl.seed_everything(0)
    module = TinyMLLMModule(layers=LAYERS)
    trainer = pl.Trainer(
        strategy="auto", accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        plugins=[ShardedCheckpointIO()],
    )  # fmt: skip
    trainer.fit(module, TinyDataModule(STEPS, microbatches=4, join_replicas=join), ckpt_path=ckpt_path)
    return module.losses


# ---- without processes ----------------------------------------------------------------------------------


def test_optimizer_state_by_name_loads_into_any_subset_and_numbers_like_one_process() -> None:
    module = TinyMLLMModule(layers=2)
    whole = torch.optim.AdamW(module.parameters(), lr=0.05)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    whole.step()
    names = optim_by_name.parameter_names(module, whole)
    state = optim_by_name.state_of(whole, names, names)
    assert set(state["state"]) == {n for n, _ in module.named_parameters()}
    # back to positions: exactly what the one-process optimizer saves
    positional = optim_by_name.to_positions(state)
    expected = whole.state_dict()
    assert positional["param_groups"] == expected["param_groups"]
    for i, s in expected["state"].items():
        assert torch.equal(positional["state"][i]["exp_avg"], s["exp_avg"])
    # a rank's optimizer holds some parameters, in its own order: each gets its own state
    held = [p for n, p in module.named_parameters() if n.startswith("model.blocks.1")][::-1]
    part = torch.optim.AdamW(held, lr=0.01)
    optim_by_name.load_into(part, optim_by_name.parameter_names(module, part), state)
    assert part.param_groups[0]["lr"] == 0.05  # the saved hyper-parameters
    by_id = dict(zip(map(id, module.parameters()), (n for n, _ in module.named_parameters()), strict=True))
    for p in held:
        assert torch.equal(part.state[p]["exp_avg"], state["state"][by_id[id(p)]]["exp_avg"])


def test_keys_name_what_they_hold_whatever_the_layout() -> None:
    state = {"state": {"a.w": {"exp_avg": 1, "step": 2}, "b.w": {"exp_avg": 3}}}
    flat = keys.flatten({"a.w": 0, "b.w": 0, "b.buf": 0}, [state])
    assert "optimizer_states.0.state.a.w.exp_avg" in flat
    assert keys.select(flat, ["b.w"], [["b.w"]]) == ["state_dict.b.w", "optimizer_states.0.state.b.w.exp_avg"]
    state_dict, states = keys.unflatten(flat, 1)
    assert state_dict == {"a.w": 0, "b.w": 0, "b.buf": 0} and states == [state["state"]]


def test_lightnings_async_checkpoint_io_makes_the_saves_background_ones() -> None:
    strategy = BigMacStrategy(pipeline_parallel_size=2)
    pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, plugins=[AsyncCheckpointIO()], logger=False)
    assert strategy._background_saves() is not None
    assert BigMacStrategy(pipeline_parallel_size=2)._background_saves() is None


# ---- real runs ---------------------------------------------------------------------------------------------

slow = pytest.mark.slow


@slow
def test_each_tensor_is_written_once_and_a_rank_reads_only_what_it_holds(saved: dict) -> None:
    ckpt = saved["ckpt"] / f"epoch=0-step={STEPS}.ckpt"
    assert_written_once(ckpt)  # the encoder and generator replicas

    module = TinyMLLMModule(layers=LAYERS)  # rank 1 of P=4 x V=2: stages 1 and 5 and the replicas
    parts = module.pipeline_parts()
    place(parts, partition(parts, pp=4, vpp=2), rank=1)
    owned = owned_state_dict(module)
    held = [n for n, p in module.named_parameters() if not p.is_meta]
    got = read_held(ckpt, owned, [held])
    assert set(got["state_dict"]) == set(owned) and len(owned) < len(module.state_dict())
    assert set(got["optimizer_states"][0]["state"]) == set(held)


@slow
def test_a_rank_killed_while_a_save_overwrites_a_checkpoint_leaves_the_previous_one(
    tmp_path: Path, saved: dict
) -> None:
    # saves: epoch 0, last, epoch 1, last (overwritten): the last rank dies after writing its file in save 4
    ckpt = tmp_path / "ckpt"
    args = [*P2, *COMMON, "--ckpt-dir", str(ckpt), "--save-last", "--die-in-save", "4"]
    out = tmp_path / "killed.json"
    killed = run([sys.executable, str(HERE / "run_tiny.py"), *args, "--out", str(out)], tmp_path)
    assert killed.returncode != 0 and not out.exists()
    assert "PeerError" in killed.stderr and "is gone" in killed.stderr  # the survivor names the lost rank
    last = ckpt / "last.ckpt"
    assert any(p.name.endswith(".partial") for p in last.iterdir())  # the killed save had begun writing
    resumed = run_tiny(tmp_path, "resumed", *P2, *COMMON, "--resume", str(last))
    assert resumed["losses"] == saved["losses"][STEPS:]  # bitwise: the step-5 state, optimizer included
    for key, values in saved["params"].items():
        assert resumed["params"][key] == values, f"{key} differs after resume"
    record(
        "a rank SIGKILLed while a save overwrites last.ckpt (P=2)",
        "the job fails; last.ckpt still holds the previous complete checkpoint and resumes from it "
        "bitwise (losses and every parameter)",
        section="Checkpoints",
    )


@slow
def test_a_p2_checkpoint_resumes_at_p4_v2(tmp_path: Path, saved: dict) -> None:
    ckpt = saved["ckpt"] / f"epoch=0-step={STEPS}.ckpt"
    p4v2 = ["--devices", "4", "--pp", "4", "--vpp", "2"]
    got = run_tiny(tmp_path, "p4v2", *p4v2, *COMMON, "--resume", str(ckpt))
    assert_close_losses(got["losses"], saved["losses"][STEPS:])


@slow
def test_a_p2_checkpoint_resumes_at_p2_x_d2_and_in_one_process(tmp_path: Path, saved: dict) -> None:
    ckpt = saved["ckpt"] / f"epoch=0-step={STEPS}.ckpt"
    # one process, from the directory itself and from its consolidated file
    assert_close_losses(fit_in_one_process(ckpt, join=1), saved["losses"][STEPS:])
    consolidated = consolidate(ckpt, tmp_path / "step5.ckpt")
    assert all(isinstance(i, int) for i in consolidated["optimizer_states"][0]["state"])  # as one process
    assert_close_losses(fit_in_one_process(tmp_path / "step5.ckpt", join=1), saved["losses"][STEPS:])
    # two replicas of a P=2 pipeline against one process over both replicas' data
    joined = fit_in_one_process(tmp_path / "step5.ckpt", join=2)
    args = ["--devices", "4", "--pp", "2", *COMMON, "--resume", str(ckpt), "--ckpt-dir", str(tmp_path / "d2")]
    got = run_tiny(tmp_path, "p2d2", *args)
    assert_close_losses(got["losses"], joined)
    assert_written_once(tmp_path / "d2" / f"epoch=1-step={2 * STEPS}.ckpt")  # stage copies too


@slow
def test_the_consolidated_checkpoint_loads_into_the_plain_module(tmp_path: Path, saved: dict) -> None:
    out = tmp_path / "full.ckpt"
    assert bigmac_cli(["consolidate", str(saved["ckpt"] / f"epoch=1-step={2 * STEPS}.ckpt"), str(out)]) == 0
    module = TinyMLLMModule.load_from_checkpoint(out)
    for key, values in saved["params"].items():
        assert module.state_dict()[key].flatten().tolist() == values
    # ... and gives the validation loss the distributed run measured with the same weights
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, limit_val_batches=3
    )
    data = TinyDataModule(steps=STEPS, microbatches=4, val_steps=3)
    metrics = trainer.validate(module, data, verbose=False)[0]
    assert metrics["val_loss"] == pytest.approx(saved["val_loss"], abs=1e-5)
    assert metrics["val_acc"] == pytest.approx(saved["val_acc"], abs=1e-7)
    plain = torch.load(out, weights_only=True)  # an ordinary checkpoint of plain types
    assert {"optimizer_states", "lr_schedulers", "loops", "callbacks"} <= set(plain)
