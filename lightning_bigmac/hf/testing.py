"""Tiny random models of every supported family and microbatches that fit them (tests, docs).

Everything builds offline from configs in milliseconds. :func:`tiny_microbatches` makes what an HF
processor would return for a few prompts, collated: ``input_ids`` with the right number of image
(and video) placeholder tokens, right padding with ``attention_mask`` zeros, ``labels`` that
ignore the placeholders, the prompt start and the padding, the pixel values and, for Qwen2-VL and
Qwen2.5-VL, the grids and ``mm_token_type_ids``. Microbatch ``j`` varies with ``j``: text-only,
one sample with images (and a video for Qwen), two padded samples with images.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2VLConfig,
)

from lightning_bigmac.batches import Microbatches
from lightning_bigmac.strategy import BigMacStrategy

from .collate import collate_processed
from .module import HFVLMModule

__all__ = ["TINY_FAMILIES", "fit_layouts", "fit_tiny", "tiny_config", "tiny_microbatches", "tiny_steps"]

TINY_FAMILIES = ("llava-llama", "llava-mistral", "llava-qwen2", "qwen2-vl", "qwen2.5-vl")
"""Every supported family; ``llava-qwen2`` ties its input and output embeddings."""

_VOCAB = 64
_IMAGE, _VIDEO, _VISION_START = 60, 61, 62
_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=_VOCAB,
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_IMAGE_GRID = (1, 4, 8)  # Qwen: 32 patches -> 8 tokens; with 2.5's 8-pixel windows, two windows
_VIDEO_GRID = (2, 4, 4)  # 32 patches -> 8 tokens
_LLAVA_IMAGE_TOKENS = 4  # 8x8 pixels in 4x4 patches, CLS dropped


def tiny_config(family: str, layers: int = 4) -> PretrainedConfig:
    """A config of ``family`` (one of :data:`TINY_FAMILIES`) with ``layers`` decoder layers."""
    if family.startswith("llava-"):
        text_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family[6:]]
        extra = {"mistral": {"sliding_window": 6}, "qwen2": {"tie_word_embeddings": True}}.get(family[6:], {})
        vision = CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8,
            patch_size=4, projection_dim=16,
        )  # fmt: skip
        text = text_cls(num_hidden_layers=layers, **_TEXT, **extra)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=_IMAGE)
    text = dict(
        _TEXT, num_hidden_layers=layers,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )  # fmt: skip
    vision = dict(depth=2, num_heads=2, patch_size=2, temporal_patch_size=2, spatial_merge_size=2)
    ids = dict(image_token_id=_IMAGE, video_token_id=_VIDEO, vision_start_token_id=_VISION_START)
    if family == "qwen2-vl":
        vision.update(embed_dim=16, hidden_size=32, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen2.5-vl":
        vision.update(
            hidden_size=16, intermediate_size=32, out_hidden_size=32, window_size=8, fullatt_block_indexes=[1]
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"unknown family {family!r}: one of {TINY_FAMILIES}")


def _sample(family: str, gen: torch.Generator, images: int, video: bool) -> dict[str, Any]:
    """One prompt: text, placeholders, text; plus its pixels and grids."""

    def text(n: int) -> list[int]:
        return torch.randint(1, _IMAGE, (n,), generator=gen).tolist()

    ids, pixels, grids, video_pixels = text(3), [], [], []
    qwen = not family.startswith("llava-")
    for _ in range(images):
        if qwen:
            t, h, w = _IMAGE_GRID
            ids += [_VISION_START] + [_IMAGE] * (t * h * w // 4)
            pixels.append(torch.randn(t * h * w, 3 * 2 * 2 * 2, generator=gen))
            grids.append(_IMAGE_GRID)
        else:
            ids += [_IMAGE] * _LLAVA_IMAGE_TOKENS
            pixels.append(torch.randn(1, 3, 8, 8, generator=gen))
        ids += text(2)
    if video:
        t, h, w = _VIDEO_GRID
        ids += [_VISION_START] + [_VIDEO] * (t * h * w // 4)
        video_pixels.append(torch.randn(t * h * w, 3 * 2 * 2 * 2, generator=gen))
    ids += text(int(torch.randint(3, 7, (1,), generator=gen)))
    return {"ids": ids, "pixels": pixels, "grids": grids, "video": video_pixels}


def _collate(family: str, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    processed = []
    for s in samples:
        ids = torch.tensor(s["ids"])
        labels = ids.masked_fill(ids >= _IMAGE, -100)
        labels[:2] = -100  # the prompt start is not trained on
        one = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if s["pixels"]:
            one["pixel_values"] = torch.cat(s["pixels"])
        if not family.startswith("llava-"):
            one["mm_token_type_ids"] = (ids == _IMAGE).long() + 2 * (ids == _VIDEO).long()
            if s["grids"]:
                one["image_grid_thw"] = torch.tensor(s["grids"])
            if s["video"]:
                one["pixel_values_videos"] = torch.cat(s["video"])
                one["video_grid_thw"] = torch.tensor([_VIDEO_GRID] * len(s["video"]))
        processed.append(one)
    return collate_processed(processed, pad_token_id=0)


def tiny_microbatches(family: str, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` microbatches for a :func:`tiny_config` model of ``family`` (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for j in range(count):
        kind = j % 3
        if kind == 0:
            samples = [_sample(family, gen, images=0, video=False)]
        elif kind == 1:
            samples = [_sample(family, gen, images=1, video=not family.startswith("llava-"))]
        else:
            samples = [
                _sample(family, gen, images=2, video=False),
                _sample(family, gen, images=1, video=False),
            ]
        out.append(_collate(family, samples))
    return out


class _Steps(Dataset):
    def __init__(self, family: str, steps: int, microbatches: int, seed: int):
        self.family, self.steps, self.microbatches, self.seed = family, steps, microbatches, seed

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> Microbatches:
        return Microbatches(tiny_microbatches(self.family, self.microbatches, seed=self.seed * 100_003 + i))


def tiny_steps(family: str, steps: int, microbatches: int = 4, seed: int = 0) -> DataLoader:
    """A loader of ``steps`` whole steps (:class:`~lightning_bigmac.Microbatches`) for ``family``;
    every rank of a pipeline reads the same steps (one data-parallel replica)."""
    return DataLoader(_Steps(family, steps, microbatches, seed), batch_size=None)


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_tiny(
    module: pl.LightningModule, family: str, strategy: Any, devices: int, steps: int, microbatches: int = 4
) -> tuple[pl.Trainer, list[float]]:
    """Fit ``module`` on CPU for ``steps`` steps of :func:`tiny_steps`, then validate one step (its loss
    is ``trainer.callback_metrics["val_loss"]``); the trainer and each training step's loss."""
    losses = _Losses()
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=1, callbacks=[losses],
    )  # fmt: skip
    val = tiny_steps(family, 1, microbatches, seed=1)
    trainer.fit(module, tiny_steps(family, steps, microbatches), val)
    return trainer, losses.losses


def fit_layouts(
    rank: int, layouts: list[tuple[int, int]], steps: int, lr: float, weight_decay: float = 0.0
) -> dict[str, Any] | None:
    """On global rank ``rank`` of a job started by :func:`lightning_bigmac.testing.spawn.run`:
    every family of :data:`TINY_FAMILIES` fitted by :func:`fit_tiny` under ``strategy="bigmac"``
    in each ``(pipeline degree, virtual chunks)`` layout (degree = world size: one data-parallel
    replica), from seed 0. Rank 0 returns ``{"<P>x<V>/<family>": {"losses", "val_loss",
    "params"}}``, ``params`` the gathered parameters."""
    world = torch.distributed.get_world_size()
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    result = {}
    for pp, vpp in layouts:
        for family in TINY_FAMILIES:
            pl.seed_everything(0, verbose=False)
            strategy = BigMacStrategy(pipeline_parallel_size=pp, virtual_chunks=vpp, timeout=120)
            module = HFVLMModule(tiny_config(family), lr=lr, weight_decay=weight_decay)
            trainer, losses = fit_tiny(module, family, strategy, world, steps)
            params = trainer.strategy.full_state_dict()
            result[f"{pp}x{vpp}/{family}"] = {
                "losses": losses, "val_loss": float(trainer.callback_metrics["val_loss"]), "params": params,
            }  # fmt: skip
    return result if rank == 0 else None
