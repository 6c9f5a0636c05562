"""A :class:`~.spec.ModelSpec` from a transformers config: its sizes, and parameters counted exactly.

The model is built on the meta device (shapes only: no storage, no initialisation, milliseconds
even for 30B parameters) and cut into parts the way the runtime cuts it: a supported VLM
(:data:`lightning_bigmac.hf.SUPPORTED_MODELS`) by its adapter (:func:`~lightning_bigmac.hf.hf_pipeline_parts`:
vision tower and projector, embedding, decoder layers, head), a text-only causal LM (e.g.
``Qwen3MoeConfig``) as embedding, layers and the rest as head. Each part's parameters are counted
once (tied embeddings: the shared weight in the embedding and in the head, once in the total), and
an MoE's active parameters are the total less the unrouted experts' share. The layer shapes
(hidden size, heads, MLP width, experts) come from the config's fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lightning_bigmac.hf.models import hf_pipeline_parts
from lightning_bigmac.hf.weights import meta_model

from .spec import LLMSpec, ModelSpec, PartSpec

__all__ = ["spec_from_hf"]

_GATE_NAMES = ("gate_proj", "gate_up_proj", "w3")  # names of a gated MLP's gate in transformers models


def _load(config: PretrainedConfig | str | Path) -> PretrainedConfig:
    if isinstance(config, PretrainedConfig):
        return config
    path = Path(config)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json or save_pretrained directory there")
    return AutoConfig.from_pretrained(path)


def _count(modules: Iterable[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _gated(module: nn.Module) -> bool:
    names = (name.rpartition(".")[2] for name, _ in module.named_parameters())
    subs = (name.rpartition(".")[2] for name, _ in module.named_modules())
    return any(n in _GATE_NAMES for n in (*names, *subs))


def _first(config: PretrainedConfig, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return default


def _llm(text: PretrainedConfig, embedding: nn.Module, blocks: list[nn.Module], head: nn.Module) -> LLMSpec:
    hidden, heads = text.hidden_size, text.num_attention_heads
    head_dim = _first(text, "head_dim", default=hidden // heads)
    experts = _first(text, "num_experts", "num_local_experts")
    params = _count([embedding, *blocks, head])
    active = params
    if experts:
        expert_params = _count(
            m for block in blocks for n, m in block.named_modules() if n.endswith("experts")
        )
        active = params - expert_params * (experts - text.num_experts_per_tok) // experts
    emb_ids = {id(p) for p in embedding.parameters()}
    return LLMSpec(
        params=params, active_params=active, hidden=hidden, layers=len(blocks), q_dim=heads * head_dim,
        kv_dim=_first(text, "num_key_value_heads", default=heads) * head_dim,
        ffn=_first(text, "intermediate_size", default=4 * hidden), gated=_gated(blocks[0]), experts=experts,
        experts_per_token=_first(text, "num_experts_per_tok") if experts else 0,
        expert_ffn=_first(text, "moe_intermediate_size", "intermediate_size") if experts else 0,
        vocab=text.vocab_size, tied=any(id(p) in emb_ids for p in head.parameters()),
        embedding_params=_count([embedding]), head_params=_count([head]),
    )  # fmt: skip


def _encoder(vision: PretrainedConfig, encoder: nn.Module) -> PartSpec:
    hidden = _first(vision, "embed_dim", "hidden_size")  # Qwen2-VL: embed_dim is the width
    ffn = _first(vision, "intermediate_size", default=int(hidden * getattr(vision, "mlp_ratio", 4)))
    return PartSpec(
        params=_count([encoder]), hidden=hidden, layers=_first(vision, "depth", "num_hidden_layers"),
        ffn=ffn, gated=_gated(encoder),
    )  # fmt: skip


def spec_from_hf(config: PretrainedConfig | str | Path) -> ModelSpec:
    """The sizes of a supported VLM or a causal LM, from its config (or a ``config.json`` / a
    ``save_pretrained`` directory); its generator is None (transformers VLMs have none)."""
    config = _load(config)
    text = config.get_text_config()
    if text is config:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        inner = model.get_decoder()
        blocks = list(inner.layers)
        embedding = model.get_input_embeddings()
        rest = [m for m in (inner.norm, model.get_output_embeddings()) if m is not None]
        head = nn.ModuleList(rest)
        return ModelSpec(name=type(model).__name__, llm=_llm(text, embedding, blocks, head))
    model = meta_model(config)
    parts = hf_pipeline_parts(model)  # TypeError naming the supported classes for any other VLM
    vision = config.vision_config
    return ModelSpec(
        name=type(model).__name__,
        llm=_llm(text, parts.embedding, list(parts.blocks), parts.head),
        encoder=_encoder(vision, parts.encoder),
        encoder_merge=getattr(vision, "spatial_merge_size", 1) ** 2,
    )
