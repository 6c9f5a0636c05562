"""``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration`` as pipeline parts.

Both families share one layout (``model.visual``, ``model.language_model``) and one forward, so one
adapter serves both. Encoder: ``model.visual`` (patch embedding, vision blocks, 2-D rotary, and in
2.5 the windowed attention with its full-attention blocks, then the patch merger) through the HF
model's own ``get_image_features`` / ``get_video_features`` on ``pixel_values`` /
``pixel_values_videos`` with ``image_grid_thw`` / ``video_grid_thw``. Embedding: image features,
then video features, replace their placeholder tokens. Context: the 3-D (temporal, height, width)
rotary positions from the model's own ``get_rope_index`` (``second_per_grid_ts`` passed on for
2.5's videos), or ``0..L-1`` on all three axes for a microbatch without images or videos, as HF's
forward computes them without a cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from lightning_bigmac.runtime.parts import PipelineParts

from .decoder import decoder_parts

__all__ = ["mm_token_type_ids", "qwen2_vl_parts"]

_MODALITIES = (
    # (encoder output key, pixels, grid, feature method of the inner model)
    ("image", "pixel_values", "image_grid_thw", "get_image_features"),
    ("video", "pixel_values_videos", "video_grid_thw", "get_video_features"),
)


def mm_token_type_ids(mb: Any, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """``mb["mm_token_type_ids"]``, or what the HF processor would have returned for its
    ``input_ids``: 0 text, 1 image placeholder, 2 video placeholder."""
    given = mb.get("mm_token_type_ids")
    if given is not None:
        return given
    ids = mb["input_ids"]
    return (ids == image_token_id).long() + 2 * (ids == video_token_id).long()


def qwen2_vl_parts(
    model: Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration,
) -> PipelineParts:
    """Encoder, embedding, decoder layers, head and stage context of a Qwen2-VL or Qwen2.5-VL model."""
    inner = model.model
    config = inner.config

    def features(mb: Any) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {}
        for key, pixels, grid, method in _MODALITIES:
            values = mb.get(pixels)
            if values is None or values.numel() == 0:
                out[key] = None
                continue
            result = getattr(inner, method)(values, mb[grid], return_dict=True)
            out[key] = torch.cat(result.pooler_output, dim=0)
        return out

    def merge(ids: torch.Tensor, h: torch.Tensor, enc: dict[str, torch.Tensor | None]) -> torch.Tensor:
        for index, (key, *_) in enumerate(_MODALITIES):
            found = enc.get(key)
            if found is None:
                continue
            found = found.to(h.device, h.dtype)
            masks = inner.get_placeholder_mask(ids, inputs_embeds=h, **{f"{key}_features": found})
            h = h.masked_scatter(masks[index], found)
        return h

    def positions(h: torch.Tensor, mb: Any) -> tuple[torch.Tensor, None]:
        grids = {grid: mb.get(grid) for _, _, grid, _ in _MODALITIES}
        if all(g is None for g in grids.values()):
            batch, length = h.shape[:2]
            return torch.arange(length, device=h.device).view(1, 1, -1).expand(3, batch, -1), None
        extra = {"second_per_grid_ts": mb["second_per_grid_ts"]} if "second_per_grid_ts" in mb else {}
        types = mm_token_type_ids(mb, config.image_token_id, config.video_token_id)
        rope, _ = inner.get_rope_index(
            mb["input_ids"],
            mm_token_type_ids=types,
            attention_mask=mb.get("attention_mask"),
            **grids,
            **extra,
        )
        return rope, None

    return decoder_parts(
        model, inner.language_model, towers={"visual": inner.visual}, features=features, merge=merge,
        positions=positions,
    )  # fmt: skip
