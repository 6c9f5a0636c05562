"""The HF adapter in one process: its loss and gradients are HF's own, unsupported classes are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import GemmaConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig

from lightning_bigmac.contract import reference_loss
from lightning_bigmac.hf import SUPPORTED_MODELS, HFVLMModule, hf_pipeline_parts
from lightning_bigmac.hf.testing import TINY_FAMILIES, tiny_config, tiny_microbatches


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_loss_and_gradients_are_hfs_own(family):
    torch.manual_seed(0)
    module = HFVLMModule(tiny_config(family))
    hf, parts = module.model, module.pipeline_parts()
    mbs = tiny_microbatches(family, 3)  # text-only; one sample with images (and a video); two padded
    assert parts.tied == ((("embed_tokens.weight", "lm_head.weight"),) if family == "llava-qwen2" else ())
    sums, counts = [], []
    for mb in mbs:
        ours, theirs = reference_loss(parts, [mb]).detach(), hf(**mb).loss.detach()  # HF's: a mean
        assert float(ours) == pytest.approx(float(theirs), abs=1e-6), family
        if "mm_token_type_ids" in mb:  # HF requires it; the adapter derives it from input_ids
            bare = {k: v for k, v in mb.items() if k != "mm_token_type_ids"}
            assert torch.equal(reference_loss(parts, [bare]).detach(), ours)
        sums.append(theirs.detach() * parts.text_targets(mb))
        counts.append(parts.text_targets(mb))
    # a step of all three: the sum over every target divided by their count, gradients included
    hf.zero_grad()
    (sum(hf(**mb).loss * n for mb, n in zip(mbs, counts, strict=True)) / sum(counts)).backward()
    want = {name: p.grad.clone() for name, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad()
    step = reference_loss(parts, mbs)
    step.backward()
    assert float(step) == pytest.approx(float(sum(sums) / sum(counts)), abs=1e-6)
    got = {name: p.grad for name, p in hf.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any("visual" in n or "vision_tower" in n for n in got)
    worst = max((got[n] - want[n]).abs().max().item() for n in want)
    assert worst < 1e-6, f"{family}: gradients differ by {worst:.2e}"


def test_the_module_keeps_hf_parameter_names():
    module = HFVLMModule(tiny_config("qwen2-vl"))
    names = list(module.state_dict())
    assert names == [f"model.{n}" for n in module.model.state_dict()]
    assert "model.model.language_model.layers.0.self_attn.q_proj.weight" in names


def test_an_unsupported_class_or_config_is_refused_with_the_way_out():
    sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    tiny = LlamaConfig(**sizes)
    for make in (lambda: hf_pipeline_parts(LlamaForCausalLM(tiny)), lambda: HFVLMModule(tiny)):
        with pytest.raises(TypeError) as err:
            make()
        assert all(name in str(err.value) for name in SUPPORTED_MODELS)
        assert "lightning_bigmac.contract" in str(err.value)
    llava = tiny_config("llava-llama")
    gemma = LlavaConfig(vision_config=llava.vision_config, text_config=GemmaConfig(**sizes))
    with pytest.raises(TypeError, match="GemmaModel language model is not supported"):
        HFVLMModule(gemma)
