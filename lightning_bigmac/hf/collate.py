"""Processed samples -> one microbatch in the format Hugging Face models take.

A microbatch is a dict of tensors, as a processor returns it for a batch::

    input_ids          [B, L]   int64  padded on the right with the pad token
    attention_mask     [B, L]   int64  1 on a sample's tokens, 0 on padding
    labels             [B, L]   int64  the token to score at each position, -100: none
    mm_token_type_ids  [B, L]   int64  (Qwen2-VL) 1 on image tokens, 2 on video tokens, 0 elsewhere
    pixel_values       [...]           every image of the microbatch, in sample order: Llava
                                       ``[images, 3, H, W]``, Qwen2-VL ``[patches, 3 * t * p * p]``
    image_grid_thw     [images, 3]     (Qwen2-VL) each image's patch grid
    pixel_values_videos, video_grid_thw  (Qwen2-VL) the same for videos

Labels are not shifted (HF models shift them inside the loss). A vision field is left out when no
sample of the microbatch has one, as a processor leaves it out for a text-only batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["TOKEN_FIELDS", "collate_processed"]

TOKEN_FIELDS = {"input_ids": None, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0}
"""Fields with one entry per token, and what pads them (None: the pad token)."""


def collate_processed(
    samples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Pad the per-token fields of ``samples`` (each ``[L_i]``) to ``[B, max L_i]``; concatenate every
    other field (``[n_i, ...]``, e.g. ``pixel_values``) along dim 0 in sample order, which is the
    order of the samples' image tokens in the padded batch read row by row."""
    if not samples:
        raise ValueError("collate_processed needs at least one sample")
    length = max(len(s["input_ids"]) for s in samples)
    out: dict[str, torch.Tensor] = {}
    for name, pad in TOKEN_FIELDS.items():
        if name not in samples[0]:
            continue
        batch = torch.full((len(samples), length), pad_token_id if pad is None else pad, dtype=torch.int64)
        for row, sample in enumerate(samples):
            batch[row, : len(sample[name])] = sample[name]
        out[name] = batch
    others = dict.fromkeys(k for s in samples for k in s if k not in TOKEN_FIELDS)
    for name in others:
        out[name] = torch.cat([s[name] for s in samples if name in s])
    return out
