"""Hugging Face weights loaded per pipeline stage, and a trained run exported back.

The reference is transformers itself: ``from_pretrained`` of the same directory must hold bitwise
the tensors (and rebuilt buffers) a rank holds, and ``from_pretrained`` of an export must compute
the logits of the trained weights. The multi-process job (4 gloo ranks) loads a sharded Llava at
P=4, recording the keys each rank read and its peak host memory, then trains a tied-embedding
Llava for two steps at P=2 x D=2 from its pretrained directory and saves a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from lightning_bigmac import BigMacStrategy
from lightning_bigmac.cli import main as bigmac_cli
from lightning_bigmac.contract import reference_loss
from lightning_bigmac.hf import HFVLMModule
from lightning_bigmac.hf.export import export_pretrained
from lightning_bigmac.hf.models import model_from_config
from lightning_bigmac.hf.pretrained import PretrainedVLMModule
from lightning_bigmac.hf.testing import fit_tiny, tiny_config, tiny_microbatches
from lightning_bigmac.hf.weights import PretrainedWeights, meta_model
from lightning_bigmac.runtime.partition import partition, place
from lightning_bigmac.testing.spawn import run

PP_LOAD, TRAIN_FAMILY, TRAIN_STEPS = 4, "llava-qwen2", 2  # llava-qwen2 ties its embeddings


def _memory_llava() -> LlavaForConditionalGeneration:
    """A Llava whose 8 decoder layers (6.6 MB each) dwarf its vision tower, so that a rank's share
    shows in its peak memory."""
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8,
        patch_size=4,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=320, intermediate_size=1280, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_id=60)
    )


def _save(model: LlavaForConditionalGeneration, directory: Path, shard: str) -> Path:
    model.save_pretrained(directory, max_shard_size=shard)
    assert (directory / "model.safetensors.index.json").is_file()  # sharded: the per-file checks bite
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)
    return {
        "memory": _save(_memory_llava(), tmp / "memory", "4MB"),
        "train": _save(LlavaForConditionalGeneration(tiny_config(TRAIN_FAMILY)), tmp / "train", "20KB"),
        "llama": _save(LlavaForConditionalGeneration(tiny_config("llava-llama")), tmp / "llama", "20KB"),
        "tmp": tmp,
    }


def _everything(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict and non-persistent buffers (rotary ``inv_freq``, CLIP ``position_ids``)."""
    return {**dict(model.named_buffers()), **model.state_dict()}


def _assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in got.items() if v.dtype != want[k].dtype or not torch.equal(v, want[k])]
    assert not bad, f"differ from from_pretrained: {bad[:5]}"


def _saved_name(name: str) -> str:
    """How transformers saves a Llava state-dict name (its pre-5.0 checkpoint layout)."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model.") :]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    return name.removeprefix("model.")


def _inputs(family: str) -> dict[str, torch.Tensor]:
    mb = tiny_microbatches(family, 3)[2]  # two padded samples, three images
    return {k: mb[k] for k in ("input_ids", "attention_mask", "pixel_values")}


# ---- one process ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava-llama", "llava-qwen2", "qwen2-vl"])  # Qwen2-VL: other renames
def test_one_process_load_is_from_pretrained_bitwise(tmp_path: Path, family: str) -> None:
    torch.manual_seed(2)
    model_from_config(tiny_config(family)).save_pretrained(tmp_path, max_shard_size="20KB")
    reference = AutoModelForImageTextToText.from_pretrained(tmp_path)
    module = PretrainedVLMModule(tmp_path)
    module.configure_model()  # no trainer: one process fills the whole model, as under strategy="auto"
    everything = _everything(module.model)
    assert everything.keys() == _everything(reference).keys()
    _assert_bitwise(everything, _everything(reference))
    mbs = tiny_microbatches(family, 3)
    with torch.no_grad():
        loss = reference_loss(module.pipeline_parts(), mbs)
        assert torch.equal(loss, reference_loss(HFVLMModule(reference).pipeline_parts(), mbs))
    files = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(module.weights.read) == sorted(files)  # each stored tensor read once


def test_auto_run_trains_from_the_directory_and_exports_from_memory(dirs: dict[str, Path]) -> None:
    module = PretrainedVLMModule(dirs["train"], lr=1e-2)
    _, losses = fit_tiny(module, TRAIN_FAMILY, "auto", devices=1, steps=1)
    model = module.model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # still tied
    pretrained = LlavaForConditionalGeneration.from_pretrained(dirs["train"])
    first = reference_loss(HFVLMModule(pretrained).pipeline_parts(), tiny_microbatches(TRAIN_FAMILY, 4))
    assert losses == [first.item()]
    out = dirs["tmp"] / "from_memory"
    export_pretrained(module, out)
    exported = LlavaForConditionalGeneration.from_pretrained(out)
    inputs = _inputs(TRAIN_FAMILY)
    with torch.no_grad():
        assert torch.equal(exported(**inputs).logits, model(**inputs).logits)
        assert not torch.equal(exported(**inputs).logits, pretrained(**inputs).logits)  # it trained


def test_weights_that_do_not_fit_the_model_are_refused(dirs: dict[str, Path]) -> None:
    directory = dirs["llama"]
    deeper = meta_model(tiny_config("llava-llama", layers=6), LlavaForConditionalGeneration)
    with pytest.raises(KeyError, match=r"holds no tensor for 18 entries.*layers\.4\."):  # 9 per layer
        PretrainedWeights(directory, deeper).materialise(deeper)
    lenient = PretrainedWeights(directory, deeper, strict=False)
    lenient.materialise(deeper)
    layers = deeper.model.language_model.layers
    assert torch.equal(layers[5].input_layernorm.weight, torch.ones(32))  # HF's _init_weights for a norm
    assert not any(k.startswith("language_model.model.layers.5.") for k in lenient.read)
    wider = tiny_config("llava-llama")
    wider.text_config.intermediate_size = 48
    wide = meta_model(wider, LlavaForConditionalGeneration)
    with pytest.raises(
        ValueError,
        match=r"layers\.0\.mlp\.\w+_proj\.weight has shape \[\d+, \d+\] but the model's tensor has",
    ):
        PretrainedWeights(directory, wide).materialise(wide)
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors\.index\.json nor"):
        PretrainedWeights(dirs["tmp"], deeper)


def test_export_refuses_what_it_cannot_write_faithfully(dirs: dict[str, Path]) -> None:
    out = dirs["tmp"] / "refused"
    with pytest.raises(ValueError, match="does not hold the whole model"):
        export_pretrained(PretrainedVLMModule(dirs["train"]), out)  # still on the meta device
    module = HFVLMModule(tiny_config(TRAIN_FAMILY))
    checkpoint = dirs["tmp"] / "untied.ckpt"
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state["model.lm_head.weight"] += 1.0
    torch.save({"state_dict": state, "hyper_parameters": {"lr": 0.1}}, checkpoint)
    with pytest.raises(ValueError, match="name no transformers config"):
        export_pretrained(checkpoint, out)
    with pytest.raises(ValueError, match=r"model\.lm_head\.weight and .*embed_tokens\.weight differ"):
        export_pretrained(checkpoint, out, config=tiny_config(TRAIN_FAMILY))
    assert not out.exists()


# ---- four processes -------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _load_at_p4(rank: int, directory: str) -> dict[str, Any]:
    """Rank ``rank`` of P=4 places its stages of the pretrained model: what it read, holds, and the
    growth of its peak resident memory (VmHWM reset just before; a first load pays one-time costs,
    lazy imports and transformers' renaming tables, of about 10 MiB)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status_bytes("VmRSS")
    module = PretrainedVLMModule(directory)
    parts = module.pipeline_parts()
    place(parts, partition(parts, PP_LOAD), rank)
    growth = _status_bytes("VmHWM") - before
    everything = _everything(module.model)
    held = {k: v.clone() for k, v in everything.items() if not v.is_meta}
    return {
        "read": list(module.weights.read),
        "opened": list(module.weights.opened),
        "held": held,
        "persistent": [k for k, v in module.model.state_dict().items() if not v.is_meta],
        "held_bytes": sum(v.nbytes for v in held.values()),
        "model_bytes": sum(v.nbytes for v in everything.values()),
        "hwm_growth": growth,
    }


def _train_at_p2(rank: int, directory: str, checkpoint: str) -> dict[str, Any]:
    """Train from the pretrained directory at P=2 x D=2 and save a checkpoint (collective)."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="4")
    module = PretrainedVLMModule(directory, lr=1e-2)
    strategy = BigMacStrategy(pipeline_parallel_size=2, microbatches=4, timeout=60)
    trainer, losses = fit_tiny(module, TRAIN_FAMILY, strategy, devices=4, steps=TRAIN_STEPS)
    trainer.save_checkpoint(checkpoint)
    held = {k: v.clone() for k, v in module.state_dict().items() if not v.is_meta}
    return {"losses": losses, "held": held}


def _job(rank: int, warm_dir: str, memory_dir: str, train_dir: str, checkpoint: str) -> dict[str, Any]:
    torch.manual_seed(rank)  # replicas must not agree by chance: the loaded values are the checkpoint's
    _load_at_p4(rank, warm_dir)  # the one-time costs, so that the measured load shows its own
    return {"load": _load_at_p4(rank, memory_dir), "train": _train_at_p2(rank, train_dir, checkpoint)}


@pytest.fixture(scope="module")
def job(dirs: dict[str, Path]) -> list[dict[str, Any]]:
    checkpoint = dirs["tmp"] / "run.ckpt"
    args = (str(dirs["llama"]), str(dirs["memory"]), str(dirs["train"]), str(checkpoint))
    results = run(_job, 4, *args, timeout=120.0, start_method="forkserver")  # imports once
    return [{**r, "checkpoint": checkpoint} for r in results]


@pytest.mark.slow
def test_each_rank_reads_and_holds_only_its_stages(dirs: dict[str, Path], job: list[dict[str, Any]]) -> None:
    directory = dirs["memory"]
    files = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    reference = _everything(LlavaForConditionalGeneration.from_pretrained(directory))
    layers = [set() for _ in range(PP_LOAD)]
    for rank, result in enumerate(r["load"] for r in job):
        _assert_bitwise(result["held"], reference)
        assert any("rotary_emb.inv_freq" in k for k in result["held"])  # rebuilt, not in the files
        wanted = {_saved_name(k) for k in result["persistent"]}
        assert wanted <= files.keys()
        assert sorted(result["read"]) == sorted(wanted)  # every held tensor once, nothing else
        assert set(result["opened"]) == {files[k] for k in wanted}
        layers[rank] = {k.split(".")[3] for k in wanted if ".layers." in k and k.startswith("language_model")}
        assert ("language_model.model.embed_tokens.weight" in wanted) == (rank == 0)
        assert ("language_model.lm_head.weight" in wanted) == (rank == PP_LOAD - 1)
    assert layers == [{"0", "1"}, {"2", "3"}, {"4", "5"}, {"6", "7"}]
    assert all(len(set(r["load"]["opened"])) < len(set(files.values())) for r in job[1:-1])


@pytest.mark.slow
def test_a_rank_peaks_at_its_share_not_the_whole_model(job: list[dict[str, Any]]) -> None:
    loads = [r["load"] for r in job]
    whole = loads[0]["model_bytes"]
    for load in loads:
        print(
            f"held {load['held_bytes'] / 2**20:.1f} MiB, VmHWM growth {load['hwm_growth'] / 2**20:.1f} MiB, "
            f"whole model {whole / 2**20:.1f} MiB"
        )
        assert load["held_bytes"] < 0.3 * whole  # two of eight layers, the vision tower, embedding or head
        assert load["hwm_growth"] < 0.5 * whole


@pytest.mark.slow
def test_export_of_a_p2_run_loads_in_transformers(dirs: dict[str, Path], job: list[dict[str, Any]]) -> None:
    losses = [r["train"]["losses"] for r in job]
    assert all(rank_losses == losses[0] for rank_losses in losses)
    pretrained = LlavaForConditionalGeneration.from_pretrained(dirs["train"])
    first = reference_loss(HFVLMModule(pretrained).pipeline_parts(), tiny_microbatches(TRAIN_FAMILY, 4))
    assert losses[0][0] == pytest.approx(first.item(), abs=1e-5)  # the run started from the loaded weights
    trained: dict[str, torch.Tensor] = {}
    for r in job:
        trained.update(r["train"]["held"])
    out = dirs["tmp"] / "exported"
    assert bigmac_cli(["export-hf", str(job[0]["checkpoint"]), str(out)]) == 0  # config from the run
    exported = LlavaForConditionalGeneration.from_pretrained(out)
    assert exported.lm_head.weight is exported.model.language_model.embed_tokens.weight
    state = {f"model.{k}": v for k, v in exported.state_dict().items()}
    assert state.keys() == trained.keys()
    _assert_bitwise(state, trained)
    initial = {f"model.{k}": v for k, v in pretrained.state_dict().items()}
    assert not torch.equal(trained["model.lm_head.weight"], initial["model.lm_head.weight"])
    module = HFVLMModule(tiny_config(TRAIN_FAMILY))
    module.load_state_dict(trained)
    inputs = _inputs(TRAIN_FAMILY)
    with torch.no_grad():
        assert torch.equal(exported(**inputs).logits, module.model(**inputs).logits)
        tokens = exported.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (2, inputs["input_ids"].shape[1] + 3)
