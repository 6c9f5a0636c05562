"""Sizes of the example MLLM and of its data; the defaults train in a few minutes on 2 CPU cores."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DataConfig", "ModelConfig"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The example MLLM: ViT encoder -> projector -> decoder-only LLM -> LM head and flow-matching head.

    ``patch_size`` and ``merge`` are also the data's geometry: the collate function patchifies
    images with them and the balancer counts LLM tokens with them (``merge x merge`` encoder
    patches become one LLM token).
    """

    patch_size: int = 8
    """Side of an encoder patch and of a generated patch, in pixels."""
    merge: int = 2
    """Encoder patches merged per side by the projector into one LLM token."""
    max_grid: int = 16
    """Most patches per image side (``max_grid * patch_size`` pixels); bounds the 2D position tables."""
    max_frames: int = 8
    """Most frames per video; bounds the temporal embedding."""
    encoder_dim: int = 96
    """ViT width."""
    encoder_layers: int = 2
    """ViT blocks (bidirectional attention within one image or one video frame)."""
    encoder_heads: int = 4
    """ViT attention heads."""
    dim: int = 128
    """LLM width."""
    layers: int = 4
    """LLM blocks: what the pipeline splits into ``pp * vpp`` stages, so at least that many."""
    heads: int = 4
    """LLM attention heads (rotary positions)."""
    vocab_size: int = 96
    """LLM vocabulary; at least the tokenizer's (``examples.mllm.tokens.VOCAB``)."""
    generator_dim: int = 256
    """Width of the flow-matching head's MLP."""
    generator_layers: int = 2
    """Residual MLP blocks of the flow-matching head."""

    def __post_init__(self) -> None:
        for width, heads in (("encoder_dim", "encoder_heads"), ("dim", "heads")):
            if getattr(self, width) % getattr(self, heads):
                values = f"{width}={getattr(self, width)}, {heads}={getattr(self, heads)}"
                raise ValueError(f"ModelConfig: {width} must be divisible by {heads}, got {values}")
        if (self.dim // self.heads) % 2:
            raise ValueError(
                f"ModelConfig: rotary positions need an even dim // heads, got {self.dim}, {self.heads}"
            )
        if self.max_grid % self.merge:
            raise ValueError(f"ModelConfig.max_grid={self.max_grid} must be a multiple of merge={self.merge}")

    @property
    def patch_dim(self) -> int:
        """Values in one RGB patch."""
        return 3 * self.patch_size * self.patch_size


def _default_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lightning-bigmac", "examples-mllm")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the example data lives, how much of it, and how the balancer packs it into steps."""

    root: str = ""
    """Cache directory of the generated webdataset shards (and the HF ``datasets`` cache under
    ``root/hf``); empty: ``$XDG_CACHE_HOME/lightning-bigmac/examples-mllm`` (or ``~/.cache/...``)."""
    sources: tuple[str, ...] = ("shapes", "photos")
    """Data sources mixed into every split: ``"shapes"`` (synthetic shapes, counts and motion) and
    ``"photos"`` (scikit-image's bundled photographs); ``"layout"`` (where a shape sits) is the
    fine-tuning notebook's new task, not in the default mix."""
    train_samples: int = 4000
    """Training samples generated per source."""
    val_samples: int = 128
    """Validation samples generated per source."""
    samples_per_shard: int = 100
    """Samples per tar shard; small shards mix the sources better (the stream shuffles shard order)."""
    reader: str = "webdataset"
    """``"webdataset"``: stream the shards through ``balancer.BalancedStream``; ``"hf"``: load them
    with HF ``datasets`` and sample with ``balancer.BalancedBatchSampler`` (map-style)."""
    microbatches: int = 4
    """Microbatches per optimizer step per data-parallel replica (a multiple of the pipeline size)."""
    token_cap: int = 320
    """Most LLM tokens (text and visual) packed into one microbatch."""
    seed: int = 0
    """Seed of data generation and of the epoch orders."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sources) - {"shapes", "photos", "layout"})
        if unknown or not self.sources:
            raise ValueError(
                f"DataConfig.sources={self.sources!r}: use a non-empty subset of shapes, photos, layout"
            )
        if self.reader not in ("webdataset", "hf"):
            raise ValueError(f"DataConfig.reader={self.reader!r}: use 'webdataset' or 'hf'")
        for name in ("train_samples", "val_samples", "samples_per_shard", "microbatches", "token_cap"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)} must be >= 1")

    @property
    def cache_dir(self) -> str:
        return self.root or _default_root()
