"""The language half of a Hugging Face VLM as pipeline parts, shared by every supported family.

A family module (:mod:`.llava`, :mod:`.qwen2_vl`) supplies three functions that say what differs
between families; :func:`decoder_parts` builds the rest from the HF modules themselves:

* ``features(mb) -> {"image": tensor | None, ...}``: the projected vision features, computed by the
  HF model's own ``get_image_features`` / ``get_video_features`` (the encoder part);
* ``merge(input_ids, embeds, enc) -> embeds``: the features placed at the placeholder tokens with the
  HF model's own ``get_placeholder_mask`` and ``masked_scatter`` (in the embedding part);
* ``positions(h, mb) -> (rotary_positions, layer_positions)``: what the HF text model feeds its rotary
  module, and the ``position_ids`` its mask function and decoder layers see (in the stage context).

Each part registers only the HF submodules it computes with, never the whole HF model, so the
runtime can place and free them separately while the HF model keeps its own parameter names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from lightning_bigmac.runtime.parts import PipelineParts

__all__ = ["LayerInputs", "decoder_parts", "layer_types", "text_targets"]

Features = Callable[[Any], dict[str, torch.Tensor | None]]
Merge = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]], torch.Tensor]
Positions = Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor | None]]

_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def layer_types(config: Any) -> list[str]:
    """The attention kind of every decoder layer, as the HF text model picks each layer's mask:
    ``config.layer_types`` where the config has it (Qwen2), else one kind for all layers, sliding
    when ``config.sliding_window`` is set (Mistral), full otherwise (Llama)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def text_targets(mb: Any) -> int:
    """Next-token targets of a microbatch: labels after the first position that are not -100."""
    return int((mb["labels"][..., 1:] != -100).sum())


@dataclass(frozen=True)
class LayerInputs:
    """What every decoder layer of a stage receives besides the hidden state (the stage context)."""

    masks: dict[str, Any]
    """Attention mask per layer type (``"full_attention"``, ``"sliding_attention"``); None where
    the attention kernel applies causality itself."""
    position_ids: torch.Tensor | None
    """The ``position_ids`` argument of the layers (None for Qwen2-VL's 3-D positions)."""
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    """Rotary ``(cos, sin)`` from the text model's rotary module."""


class _Encoder(nn.Module):
    """The vision tower and projector (or merger); ``forward`` is the family's ``features``."""

    def __init__(self, towers: dict[str, nn.Module], features: Features):
        super().__init__()
        for name, module in towers.items():
            self.add_module(name, module)
        self.features = features

    def forward(self, mb: Any) -> dict[str, torch.Tensor | None]:
        return self.features(mb)


class _Embedding(nn.Module):
    def __init__(self, embed_tokens: nn.Module, merge: Merge):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.merge = merge

    def forward(self, mb: Any, enc: dict[str, torch.Tensor | None] | None) -> torch.Tensor:
        h = self.embed_tokens(mb["input_ids"])
        return h if enc is None else self.merge(mb["input_ids"], h, enc)


class _Context(nn.Module):
    """Positions, the masks of the layer types present and rotary cos/sin, once per stage; holds
    the text model's rotary module (buffers only)."""

    def __init__(self, rotary_emb: nn.Module, config: Any, positions: Positions):
        super().__init__()
        self.rotary_emb = rotary_emb
        self.config = config
        self.positions = positions
        self.types = sorted(set(layer_types(config)))

    def forward(self, h: torch.Tensor, mb: Any) -> LayerInputs:
        rotary_positions, layer_positions = self.positions(h, mb)
        masks = {
            kind: _MASKS[kind](
                config=self.config,
                inputs_embeds=h,
                attention_mask=mb.get("attention_mask"),
                cache=None,
                position_ids=layer_positions,
            )
            for kind in self.types
        }
        return LayerInputs(masks, layer_positions, self.rotary_emb(h, rotary_positions))


class _Block(nn.Module):
    """One HF decoder layer called as the HF text model calls it, from the stage context."""

    def __init__(self, layer: nn.Module, kind: str):
        super().__init__()
        self.layer = layer
        self.kind = kind

    def forward(self, h: torch.Tensor, ctx: LayerInputs) -> torch.Tensor:
        return self.layer(
            h,
            attention_mask=ctx.masks[self.kind],
            position_ids=ctx.position_ids,
            position_embeddings=ctx.position_embeddings,
        )


class _Head(nn.Module):
    """Final norm, LM head and the HF model's own causal-LM loss, summed over the targets."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, loss_function: Callable, vocab_size: int):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.loss_function = loss_function
        self.vocab_size = vocab_size

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def forward(self, h: torch.Tensor, mb: Any) -> torch.Tensor:
        # num_items_in_batch=1 makes HF's loss a sum: the runtime divides by the step's target count
        return self.loss_function(
            logits=self.logits(h), labels=mb["labels"], vocab_size=self.vocab_size, num_items_in_batch=1
        )

    def predictions(self, h: torch.Tensor, mb: Any) -> dict[str, torch.Tensor]:
        """Greedy next-token predictions and the targets they answer (-100: none), position by
        position: what a token-accuracy metric or a check against ``generate`` reads."""
        with torch.no_grad():
            preds = self.logits(h).argmax(-1)
        targets = F.pad(mb["labels"][..., 1:], (0, 1), value=-100)
        return {"preds": preds, "labels": targets}


def decoder_parts(
    model: nn.Module,
    text_model: nn.Module,
    *,
    towers: dict[str, nn.Module],
    features: Features,
    merge: Merge,
    positions: Positions,
) -> PipelineParts:
    """The :class:`PipelineParts` of an HF ``...ForConditionalGeneration`` ``model`` whose language
    model is ``text_model`` (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) and whose vision
    side is ``towers`` (registered in the encoder under these names); ``features``, ``merge`` and
    ``positions`` are the family's functions described in the module docstring."""
    config = text_model.config
    kinds = layer_types(config)
    head = _Head(text_model.norm, model.lm_head, model.loss_function, config.vocab_size)
    return PipelineParts(
        encoder=_Encoder(towers, features),
        embedding=_Embedding(text_model.embed_tokens, merge),
        blocks=[_Block(layer, kinds[i]) for i, layer in enumerate(text_model.layers)],
        head=head,
        context=_Context(text_model.rotary_emb, config, positions),
        text_targets=text_targets,
        eval_outputs=head.predictions,
    )
