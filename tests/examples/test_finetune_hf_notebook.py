"""``examples/finetune_hf.ipynb`` runs top to bottom (nbclient), as it is: a tiny LLaVA fine-tuned on
2 forked processes, exported and reloaded with transformers.

Besides what the notebook prints, the files it leaves are checked here: the loss curve it plotted,
the Gantt chart it showed, and the exported directory against the run's consolidated checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from transformers import LlavaForConditionalGeneration

from lightning_bigmac.testing.spawn import child_env

ROOT = Path(__file__).parent.parent.parent
NOTEBOOK = ROOT / "examples" / "finetune_hf.ipynb"


def _printed(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")


def _cell(notebook: nbformat.NotebookNode, source: str) -> nbformat.NotebookNode:
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and source in c.source]
    return cell


@pytest.mark.slow
def test_finetune_hf_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "finetune_hf"
    for key in os.environ.keys() - child_env().keys():  # the kernel's processes pick their own rendezvous
        monkeypatch.delenv(key)
    monkeypatch.setenv("FINETUNE_HF_OUT", str(out))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()

    # the loss fell: the curve the notebook plotted, from the run's metrics
    losses = [loss for _, loss in json.loads((out / "metrics.json").read_text())["train_loss"]]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert f"of the last 5 {last:.2f}" in _printed(_cell(notebook, "metrics.json"))

    # the notebook showed the profiled step's Gantt chart
    (shown,) = [o for o in _cell(notebook, "gantt.png").outputs if "image/png" in o.get("data", {})]
    assert base64.b64decode(shown["data"]["image/png"]) == (out / "profile" / "gantt.png").read_bytes()

    # the kernel's module (every stage back from the forked ranks) and the export compute the same logits
    assert "exported logits == trained module's logits: True" in _printed(_cell(notebook, "torch.equal"))
    answered = re.search(r"-> '(.*)' \((\d+) new tokens", _printed(_cell(notebook, "tuned.generate")))
    assert answered is not None and int(answered[2]) >= 1

    # the export holds the run's trained tensors bit for bit, and they moved from the starting ones
    trained = torch.load(out / "consolidated.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    exported = LlavaForConditionalGeneration.from_pretrained(out / "hf").state_dict()
    assert {f"model.{k}" for k in exported} == trained.keys()
    assert all(torch.equal(t, trained[f"model.{k}"]) for k, t in exported.items())
    base = LlavaForConditionalGeneration.from_pretrained(out / "base").state_dict()
    moved = ("lm_head.weight", "model.vision_tower.encoder.layers.0.mlp.fc1.weight")  # LLM head, vision tower
    assert all(not torch.equal(base[k], exported[k]) for k in moved)
