"""A tiny but real multimodal LLM for runtime tests: ViT-ish encoder, decoder LLM, generator head.

A microbatch is one packed sequence, a dict of tensors::

    images      [n, patches, patch_dim]  float, n >= 0 images of ``patches`` patches each
    tokens      [S]                      int64 text tokens (S >= 1)
    labels      [S]                      int64 next-token targets, -100 = no target
    gen_target  [n, patches, patch_dim]  float, what the generator should produce per image patch

The LLM sees ``n * patches`` image positions followed by ``S`` text positions. The generator
reads the last stage's hidden states at the image positions and regresses ``gen_target``.
Two variants exercise contract options: ``TinyConfig(rotary=True)`` gives the LLM blocks rotary
positions from a stage context (:class:`RotaryContext`), ``TinyConfig(tied=True)`` ties the LM
head's weight to the token embedding.
:meth:`TinyMLLM.reference_loss` computes the step loss in one process, the same formula as the
pipeline runtime (:mod:`lightning_bigmac.runtime.parts`), so gradients can be compared exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_bigmac.contract import reference_loss
from lightning_bigmac.runtime.parts import LossWeights, PipelineParts

__all__ = ["RotaryContext", "TinyConfig", "TinyMLLM", "make_microbatches"]


@dataclass(frozen=True, kw_only=True)
class TinyConfig:
    """Sizes of the tiny model; the defaults make a step of 8 microbatches take milliseconds."""

    dim: int = 32
    heads: int = 2
    layers: int = 4
    """LLM blocks (split into pipeline stages)."""
    encoder_layers: int = 1
    vocab: int = 50
    patches: int = 4
    """Patches per image."""
    patch_dim: int = 12
    max_len: int = 96
    """Longest packed sequence (image positions + text tokens)."""
    rotary: bool = False
    """LLM blocks take rotary tables from the stage context (``PipelineParts.context``)."""
    tied: bool = False
    """The LM head's weight is the token embedding's (tied embeddings)."""


class RotaryContext(nn.Module):
    """Stage context of the rotary variant: ``{"cos", "sin"}`` ``[L, head_dim / 2]`` at positions
    ``0..L-1`` of the hidden state, from an ``inv_freq`` buffer; counts how often it is built."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        half = cfg.dim // cfg.heads // 2
        self.register_buffer("inv_freq", 10000.0 ** (-torch.arange(half) / half), persistent=False)
        self.calls = 0

    def forward(self, h: torch.Tensor, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        angles = (
            torch.arange(h.shape[-2], device=h.device, dtype=self.inv_freq.dtype)[:, None] * self.inv_freq
        )
        return {"cos": angles.cos().to(h.dtype), "sin": angles.sin().to(h.dtype)}


def _rotate(x: torch.Tensor, ctx: dict[str, torch.Tensor]) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2, cos, sin = x[..., :half], x[..., half:], ctx["cos"], ctx["sin"]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block; causal for the LLM, bidirectional within an image for the encoder;
    with a context (:class:`RotaryContext`) it rotates queries and keys."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, ctx: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        *batch, length, dim = h.shape  # [..., L, D]
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        heads = self.heads
        q, k, v = (t.reshape(*batch, length, heads, dim // heads).transpose(-2, -3) for t in (q, k, v))
        if ctx is not None:
            q, k = _rotate(q, ctx), _rotate(k, ctx)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [..., heads, L, D/heads]
        h = h + self.proj(a.transpose(-2, -3).reshape(*batch, length, dim))
        return h + self.mlp(self.norm2(h))


class Encoder(nn.Module):
    """Patch projection + bidirectional block per image; returns ``{"features": [n, patches, dim]}``."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.patches, cfg.dim) * 0.02)
        layers = range(cfg.encoder_layers)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, causal=False) for _ in layers)
        self.norm = nn.LayerNorm(cfg.dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.proj(mb["images"]) + self.pos  # [n, patches, dim]
        for block in self.blocks:
            x = block(x)
        return {"features": self.norm(x)}


class Embedding(nn.Module):
    """Token embedding, merge of the encoder features in front of the text, learned positions."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)

    def forward(self, mb: dict[str, torch.Tensor], enc: dict[str, torch.Tensor] | None) -> torch.Tensor:
        h = self.tokens(mb["tokens"])  # [S, D]
        if enc is not None:
            h = torch.cat([enc["features"].reshape(-1, h.shape[-1]), h])  # [n*patches + S, D]
        return h + self.pos(torch.arange(h.shape[0], device=h.device))


class Head(nn.Module):
    """Final norm, LM head and the summed cross-entropy over the text positions."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.vocab)

    def logits(self, h: torch.Tensor, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.out(self.norm(h[h.shape[0] - mb["labels"].shape[0] :]))  # text positions are last

    def forward(self, h: torch.Tensor, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(h, mb), mb["labels"], ignore_index=-100, reduction="sum")

    def predict(self, h: torch.Tensor, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Evaluation outputs for a metric: predicted and true next tokens."""
        return {"preds": self.logits(h, mb).argmax(-1), "labels": mb["labels"]}


class Generator(nn.Module):
    """Regresses each image patch from the LLM's hidden state at that patch; summed squared error."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, 2 * cfg.dim), nn.GELU())
        self.out = nn.Linear(2 * cfg.dim, cfg.patch_dim)

    def forward(self, h: torch.Tensor, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        target = mb["gen_target"]  # [n, patches, patch_dim]
        pred = self.out(self.net(h[: target.shape[0] * target.shape[1]]))
        return ((pred - target.reshape(pred.shape)) ** 2).sum()


def _text_targets(mb: dict[str, torch.Tensor]) -> int:
    return int((mb["labels"] != -100).sum())


def _generator_targets(mb: dict[str, torch.Tensor]) -> int:
    return mb["gen_target"].numel()


class TinyMLLM(nn.Module):
    """The whole model; :meth:`parts` is its pipeline contract, :meth:`reference_loss` the oracle."""

    def __init__(self, cfg: TinyConfig | None = None, seed: int = 0):
        super().__init__()
        self.cfg = cfg = cfg or TinyConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = Encoder(cfg)
            self.embedding = Embedding(cfg)
            self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, causal=True) for _ in range(cfg.layers))
            self.head = Head(cfg)
            self.generator = Generator(cfg)
        if cfg.tied:
            self.head.out.weight = self.embedding.tokens.weight
        self.context = RotaryContext(cfg) if cfg.rotary else None

    def parts(self) -> PipelineParts:
        return PipelineParts(
            embedding=self.embedding,
            blocks=list(self.blocks),
            head=self.head,
            text_targets=_text_targets,
            encoder=self.encoder,
            generator=self.generator,
            generator_targets=_generator_targets,
            eval_outputs=self.head.predict,
            context=self.context,
        )

    def reference_loss(
        self,
        microbatches: Sequence[dict[str, torch.Tensor]],
        *,
        encoder: bool = True,
        generator: bool = True,
        weights: LossWeights | None = None,
    ) -> torch.Tensor:
        """The step loss in one process: the runtime's formula over all ``microbatches``."""
        return reference_loss(
            self.parts(), microbatches, weights=weights, encoder=encoder, generator=generator
        )


def make_microbatches(
    cfg: TinyConfig,
    count: int,
    *,
    seed: int = 0,
    images: tuple[int, int] = (0, 3),
    text: tuple[int, int] = (2, 12),
    equal: bool = False,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """``count`` random microbatches with image counts in ``images`` and text lengths in ``text``.

    ``equal``: every microbatch has the largest image count and text length (for memory tests).
    ``sizes``: the ``(images, text tokens)`` of each microbatch instead (e.g. from the balancer).
    Roughly a quarter of the text positions carry no target (-100).
    """
    if sizes is not None and len(sizes) != count:
        raise ValueError(f"{len(sizes)} sizes for {count} microbatches")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = images[1] if equal else int(torch.randint(images[0], images[1] + 1, (), generator=g))
        s = text[1] if equal else int(torch.randint(text[0], text[1] + 1, (), generator=g))
        if sizes is not None:
            n, s = sizes[i]
        if n * cfg.patches + s > cfg.max_len:
            raise ValueError(f"{n} images and {s} tokens exceed TinyConfig.max_len={cfg.max_len}")
        labels = torch.randint(0, cfg.vocab, (s,), generator=g)
        labels[torch.rand(s, generator=g) < 0.25] = -100
        out.append(
            {
                "images": torch.randn(n, cfg.patches, cfg.patch_dim, generator=g),
                "tokens": torch.randint(0, cfg.vocab, (s,), generator=g),
                "labels": labels,
                "gen_target": torch.randn(n, cfg.patches, cfg.patch_dim, generator=g),
            }
        )
    return out
