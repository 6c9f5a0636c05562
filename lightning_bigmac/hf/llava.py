"""``LlavaForConditionalGeneration`` (Llama, Mistral or Qwen2 language model) as pipeline parts.

Encoder: the vision tower and the multimodal projector through ``LlavaModel.get_image_features``,
so ``vision_feature_layer``, ``vision_feature_select_strategy`` and ``image_sizes`` act exactly as
in HF's forward. Embedding: the projected features replace the ``image_token_id`` embeddings.
Context: positions ``0..L-1`` as the text models build them without a cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaModel, LlavaForConditionalGeneration, MistralModel, Qwen2Model

from lightning_bigmac.runtime.parts import PipelineParts

from .decoder import decoder_parts

__all__ = ["LLAVA_TEXT_MODELS", "llava_parts"]

LLAVA_TEXT_MODELS = (LlamaModel, MistralModel, Qwen2Model)
"""Language models of Llava the adapter supports (their layers take the same arguments)."""


def llava_parts(model: LlavaForConditionalGeneration) -> PipelineParts:
    """Encoder, embedding, decoder layers, head and stage context of a Llava model."""
    inner = model.model
    text = inner.language_model
    if not isinstance(text, LLAVA_TEXT_MODELS):
        names = ", ".join(cls.__name__ for cls in LLAVA_TEXT_MODELS)
        raise TypeError(
            f"Llava with a {type(text).__name__} language model is not supported (supported: {names}); "
            "write pipeline_parts() by hand, see lightning_bigmac.contract and docs/hf.md"
        )

    def features(mb: Any) -> dict[str, torch.Tensor | None]:
        pixels = mb.get("pixel_values")
        if pixels is None or pixels.numel() == 0:
            return {"image": None}
        sizes = mb.get("image_sizes")
        extra = {} if sizes is None else {"image_sizes": sizes}
        out = inner.get_image_features(pixel_values=pixels, return_dict=True, **extra)
        return {"image": torch.cat(out.pooler_output, dim=0)}

    def merge(ids: torch.Tensor, h: torch.Tensor, enc: dict[str, torch.Tensor | None]) -> torch.Tensor:
        image = enc["image"]
        if image is None:
            return h
        image = image.to(h.device, h.dtype)
        return h.masked_scatter(inner.get_placeholder_mask(ids, inputs_embeds=h, image_features=image), image)

    def positions(h: torch.Tensor, mb: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        return ids, ids

    towers = {"vision_tower": inner.vision_tower, "multi_modal_projector": inner.multi_modal_projector}
    return decoder_parts(model, text, towers=towers, features=features, merge=merge, positions=positions)
