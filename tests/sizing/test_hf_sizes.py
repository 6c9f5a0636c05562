"""Model sizes from transformers configs: parameters counted on the meta device equal the real model's."""

from __future__ import annotations

import pytest
from transformers import Qwen3MoeConfig

from lightning_bigmac.cli import main
from lightning_bigmac.hf import hf_pipeline_parts, model_from_config
from lightning_bigmac.hf.testing import tiny_config
from lightning_bigmac.sizing import PAPER_MODEL, estimate_fit
from lightning_bigmac.sizing.hf_sizes import spec_from_hf
from lightning_bigmac.sizing.spec import Workload


def _unique(*modules) -> int:
    return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "llava-qwen2"])
def test_a_tiny_vlm_config_gives_its_models_sizes(family, tmp_path):
    config = tiny_config(family)
    spec = spec_from_hf(config)
    parts = hf_pipeline_parts(model_from_config(config))  # allocated for real: the counts to match
    llm = spec.llm
    assert spec.encoder.params == _unique(parts.encoder)
    assert llm.params == _unique(parts.embedding, *parts.blocks, parts.head)
    assert (llm.embedding_params, llm.head_params) == (_unique(parts.embedding), _unique(parts.head))
    assert llm.layer_params == _unique(parts.blocks[0]) and llm.tied == (family == "llava-qwen2")
    assert (llm.hidden, llm.layers, llm.q_dim, llm.kv_dim, llm.ffn, llm.gated) == (32, 4, 32, 16, 64, True)
    enc = spec.encoder
    want = {
        "qwen2-vl": (16, 2, 32, False, 4),
        "qwen2.5-vl": (16, 2, 32, True, 4),
        "llava-qwen2": (16, 2, 32, False, 1),
    }
    assert (enc.hidden, enc.layers, enc.ffn, enc.gated, spec.encoder_merge) == want[family]
    config.save_pretrained(tmp_path)
    assert spec_from_hf(tmp_path) == spec == spec_from_hf(tmp_path / "config.json")
    est = estimate_fit(spec, Workload(sequence=64, image_tokens=16), pp=2, microbatches=4)
    assert est.ranks[0].weights["encoder"] == 2 * enc.params


def test_a_causal_lm_config_counts_experts_and_active_parameters():
    config = Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
    )  # fmt: skip
    spec = spec_from_hf(config)
    llm = spec.llm
    assert spec.encoder is None and (llm.experts, llm.experts_per_token, llm.expert_ffn) == (4, 2, 16)
    expert = 3 * 32 * 16  # gate, up, down of one expert
    assert llm.active_params == llm.params - 2 * (4 - 2) * expert  # 2 layers, 2 unrouted experts each
    assert (llm.q_dim, llm.kv_dim, llm.gated) == (32, 16, True)


def test_the_paper_llm_is_qwen3_30b_a3b_as_transformers_builds_it():
    config = Qwen3MoeConfig(num_hidden_layers=48, head_dim=128)  # the other defaults are Qwen3-30B-A3B's
    llm = spec_from_hf(config).llm
    mine = PAPER_MODEL.llm
    assert (
        (llm.params, llm.active_params)
        == (mine.params, mine.active_params)
        == (30_532_122_624, 3_353_032_704)
    )
    assert llm.layer_elements() == mine.layer_elements()
    assert (llm.embedding_params, llm.head_params, llm.tied) == (
        mine.embedding_params,
        mine.head_params,
        False,
    )


def test_the_command_reads_a_config_and_adds_a_generator(tmp_path, capsys):
    tiny_config("qwen2-vl").save_pretrained(tmp_path)
    argv = ["fit", "--hf-config", str(tmp_path), "--sequence", "64", "--image-tokens", "16", "--pp", "2"]
    assert main([*argv, "--generator", "params=1M,hidden=32,layers=2", "--generator-tokens", "16"]) == 0
    text = capsys.readouterr().out
    assert (
        "model: Qwen2VLForConditionalGeneration (parts replaced)" in text and "activations generator" in text
    )
    assert main(["fit", "--hf-config", str(tmp_path / "nowhere"), "--sequence", "64"]) == 2
    assert "no config.json or save_pretrained directory there" in capsys.readouterr().err
