"""``examples/finetune.ipynb`` runs top to bottom (nbclient), shrunk by its environment variables.

With no base run it takes the fresh-clone path: it trains a short base model with the notebook
launcher first, then fine-tunes it on the layout task on 2 forked processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from examples.mllm import ExampleMLLM
from lightning_bigmac.testing.spawn import child_env

ROOT = Path(__file__).parent.parent.parent
NOTEBOOK = ROOT / "examples" / "finetune.ipynb"


@pytest.mark.slow
def test_finetune_notebook_runs_top_to_bottom(tmp_path: Path, data_root: str, monkeypatch) -> None:
    out = tmp_path / "finetune"
    settings = {
        "FINETUNE_BASE_RUN": str(tmp_path / "no-main-job"),
        "FINETUNE_OUT": str(out),
        "FINETUNE_STEPS": "8",
        "FINETUNE_BASE_STEPS": "4",
        "FINETUNE_SAMPLES": "120",
        "FINETUNE_DATA_ROOT": data_root,
    }
    for key in os.environ.keys() - child_env().keys():  # the kernel's processes pick their own rendezvous
        monkeypatch.delenv(key)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()

    printed = "".join(
        o.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
    )
    assert "training a base model for 4 steps first" in printed
    assert "answer accuracy" in printed
    assert (out / "finetune.png").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_loss"]) == 8
    base = ExampleMLLM.load_from_checkpoint(out / "base" / "consolidated.ckpt").state_dict()
    tuned = ExampleMLLM.load_from_checkpoint(out / "consolidated.ckpt").state_dict()
    assert base.keys() == tuned.keys()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("blocks.") for k in changed)
