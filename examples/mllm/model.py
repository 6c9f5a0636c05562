"""The example MLLM: a ViT at native resolution, a projector, a decoder-only LLM and a flow-matching head.

Read top-down: attention within segments, the transformer block, the four parts the pipeline
places (encoder, embedding with the projector, LLM blocks, head) plus the generator, then the
LightningModule that names them in :meth:`ExampleMLLM.pipeline_parts`. A microbatch is one packed
sequence of several samples (format in :mod:`examples.mllm.collate`).

Packing without cross-talk: every attention runs within a *segment*, one sample in the LLM
(causal) and one image or one video frame in the encoder (bidirectional). Segments are batched
with padding, so cost grows with the sum of squared segment lengths, not the square of the pack.
LLM positions (rotary) restart at 0 for each sample. Hence a pack's loss sum equals the sum of its
samples' loss sums, each computed alone, and the balancer may pack any samples together (its
cost model: ``llm_attention="sample"``).

The hidden state that crosses pipeline stages is ``h [S, D]`` alone. What every block derives
from the microbatch, the segment ids and the rotary tables at the positions, is the stage context
(:meth:`ExampleMLLM.llm_context`), which each stage builds once from ``mb``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import MeanMetric

from lightning_bigmac import LossWeights, PipelineParts, step_loss
from lightning_bigmac.runtime.parts import run_blocks

from .collate import collate, unpatchify
from .config import ModelConfig
from .sources import Record
from .tokens import GEN, IMG, VOCAB

__all__ = ["Block", "Embedding", "ExampleMLLM", "FlowHead", "Head", "VisionEncoder", "segment_attention"]

Context = dict[str, torch.Tensor]


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor, *, causal: bool
) -> torch.Tensor:
    """Attention of ``q, k, v [L, heads, d]`` within each segment; ``segments [L]`` is sorted, from 0.

    The segments are gathered into a padded batch ``[segments, heads, longest, d]``: no position
    ever sees another segment, and the work is that of the segments, not of the whole pack.
    """
    length, heads, d = q.shape
    counts = torch.bincount(segments)  # [n] positions per segment
    offset = torch.arange(length, device=q.device) - (counts.cumsum(0) - counts)[segments]  # [L]
    longest = int(counts.max())

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(len(counts), longest, heads, d).index_put((segments, offset), x)
        return out.transpose(1, 2)  # [n, heads, longest, d]

    mask = (torch.arange(longest, device=q.device) < counts[:, None])[:, None, None, :]  # [n, 1, 1, longest]
    if causal:
        mask = mask & torch.ones(longest, longest, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask)  # [n, H, max, d]
    return out.transpose(1, 2)[segments, offset]  # [L, H, d]


def rotary(positions: torch.Tensor, d: int, base: float = 10000.0) -> Context:
    """Rotary tables ``{"cos", "sin"}`` ``[L, 1, d/2]`` of heads of size ``d`` at ``positions [L]``."""
    half = d // 2
    freqs = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)  # [d/2]
    angles = positions[:, None].float() * freqs  # [L, d/2]
    return {"cos": angles.cos()[:, None], "sin": angles.sin()[:, None]}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x [L, heads, d]`` with the tables of :func:`rotary`."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block, ``block(h, ctx) -> h``; ``ctx`` holds the ``segments`` attention
    stays within and, in the causal LLM, the rotary tables (:func:`rotary`). The encoder's positions
    are learned embeddings added at its input."""

    def __init__(self, dim: int, heads: int, *, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        length, dim = h.shape  # [L, D]
        q, k, v = self.qkv(self.norm1(h)).view(length, 3, self.heads, -1).unbind(1)  # [L, H, D/H] each
        if self.causal:
            q, k = rotate(q, ctx["cos"], ctx["sin"]), rotate(k, ctx["cos"], ctx["sin"])
        a = segment_attention(q, k, v, ctx["segments"], causal=self.causal)  # [L, H, D/H]
        h = h + self.proj(a.reshape(length, dim))
        return h + self.mlp(self.norm2(h))


class VisionEncoder(nn.Module):
    """ViT over patches at each image's native size: ``encoder(mb) -> {"features": [N, E]}``.

    Positions are learned row, column and frame embeddings (a video is frames with a temporal
    embedding); attention stays within one image or one frame.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch = nn.Linear(cfg.patch_dim, cfg.encoder_dim)
        self.row = nn.Embedding(cfg.max_grid, cfg.encoder_dim)
        self.col = nn.Embedding(cfg.max_grid, cfg.encoder_dim)
        self.frame = nn.Embedding(cfg.max_frames, cfg.encoder_dim)
        for table in (self.row, self.col, self.frame):  # N(0, 1) would drown the pixels at the input
            nn.init.normal_(table.weight, std=0.02)
        layers = range(cfg.encoder_layers)
        self.blocks = nn.ModuleList(Block(cfg.encoder_dim, cfg.encoder_heads, causal=False) for _ in layers)
        self.norm = nn.LayerNorm(cfg.encoder_dim)

    def forward(self, mb: dict[str, Any]) -> dict[str, torch.Tensor]:
        pos = mb["patch_pos"]  # [N, 3] row, column, frame
        x = self.patch(mb["patches"])  # [N, E]
        x = x + self.row(pos[:, 0]) + self.col(pos[:, 1]) + self.frame(pos[:, 2])
        if len(x):  # a text-only microbatch has no patches
            for block in self.blocks:
                x = block(x, {"segments": mb["patch_spans"]})
        return {"features": self.norm(x)}


class Embedding(nn.Module):
    """Stage 0: token embedding; the projector, which merges ``merge x merge`` encoder patches into
    one LLM token at each ``<img>`` position; the 2D position of each patch to generate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.merged = cfg.merge * cfg.merge * cfg.encoder_dim
        self.projector = nn.Sequential(
            nn.LayerNorm(self.merged), nn.Linear(self.merged, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.gen_row = nn.Embedding(cfg.max_grid, cfg.dim)
        self.gen_col = nn.Embedding(cfg.max_grid, cfg.dim)

    def forward(self, mb: dict[str, Any], enc: dict[str, torch.Tensor] | None) -> torch.Tensor:
        tokens = mb["tokens"]
        h = self.tokens(tokens)  # [S, D]
        if enc is not None:
            visual = self.projector(enc["features"].reshape(-1, self.merged))  # [N / merge², D]
            at = (tokens == IMG).nonzero().squeeze(1)
            if len(at) != len(visual):
                raise ValueError(
                    f"{len(at)} <img> tokens, {len(visual)} merged encoder tokens: see collate()"
                )
            h = h.index_put((at,), visual)
        gen, pos = (tokens == GEN).nonzero().squeeze(1), mb["gen_pos"]  # pos: [G, 2]
        return h.index_add(0, gen, self.gen_row(pos[:, 0]) + self.gen_col(pos[:, 1]))


class Head(nn.Module):
    """Last stage: final norm, LM head (untied from the token embedding) and the summed cross-entropy."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(h))  # [..., vocab]

    def forward(self, h: torch.Tensor, mb: dict[str, Any]) -> torch.Tensor:
        labels = mb["labels"]
        at = (labels != -100).nonzero().squeeze(1)  # only target positions pay for the vocabulary
        return F.cross_entropy(self.logits(h[at]), labels[at], reduction="sum")


class FlowHead(nn.Module):
    """Generator: flow matching per image patch, conditioned on the LLM's hidden state at its ``<gen>``.

    Along ``x_t = (1 - t) x0 + t x1`` from noise ``x0`` to the patch ``x1`` it predicts the velocity
    ``x1 - x0``; the loss is the summed squared error over every value of every patch. The noise and
    times come with the microbatch (drawn by the data pipeline), so any rank computes the same loss.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.generator_dim
        self.cond = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, width))
        self.x_in = nn.Linear(cfg.patch_dim, width)
        self.t_in = nn.Linear(16, width)
        mlp = lambda: nn.Sequential(  # noqa: E731
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.blocks = nn.ModuleList(mlp() for _ in range(cfg.generator_layers))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, cfg.patch_dim))

    def velocity(self, h: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Hidden states ``h [G, D]``, noisy patches ``x_t [G, P]``, times ``t [G]`` -> velocity ``[G, P]``"""
        angles = t[:, None] * (math.pi * 2.0 ** torch.arange(8, device=t.device))  # [G, 8]
        time = torch.cat([angles.cos(), angles.sin()], dim=-1)  # [G, 16]
        z = self.cond(h) + self.x_in(x_t) + self.t_in(time)  # [G, W]
        for block in self.blocks:
            z = z + block(z)
        return self.out(z)

    def forward(self, h: torch.Tensor, mb: dict[str, Any]) -> torch.Tensor:
        at = (mb["tokens"] == GEN).nonzero().squeeze(1)
        x0, x1, t = mb["gen_noise"], mb["gen_target"], mb["gen_time"]  # [G, P], [G, P], [G]
        x_t = (1 - t)[:, None] * x0 + t[:, None] * x1
        return ((self.velocity(h[at], x_t, t) - (x1 - x0)) ** 2).sum()


def _text_targets(mb: dict[str, Any]) -> int:
    return int((mb["labels"] != -100).sum())


def _generator_targets(mb: dict[str, Any]) -> int:
    return mb["gen_target"].numel()


class ExampleMLLM(pl.LightningModule):
    """The example MLLM as a LightningModule that meets the BigMac contract and trains under any strategy.

    Validation logs ``val_loss``, ``val_answer_acc`` (a question counts as right when every answer
    word is the argmax under teacher forcing) and ``val_chance_acc`` (the same questions answered
    uniformly at random). The accuracy needs the last stage's hidden states, so it is computed
    there by :meth:`answer_outcomes` (the contract's ``eval_outputs`` hook) and handed to every
    rank by ``step_loss(..., with_outputs=True)``; under ``"auto"`` the same hook runs in-process.
    """

    def __init__(
        self,
        config: ModelConfig | None = None,
        *,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 20,
        generator_weight: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.config = cfg = config or ModelConfig()
        if cfg.vocab_size < len(VOCAB):
            raise ValueError(f"ModelConfig.vocab_size={cfg.vocab_size} < the tokenizer's {len(VOCAB)} tokens")
        self.encoder = VisionEncoder(cfg)
        self.embedding = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, causal=True) for _ in range(cfg.layers))
        self.head = Head(cfg)
        self.generator = FlowHead(cfg)
        self.loss_weights = LossWeights(text=1.0, generator=generator_weight)
        self.answer_acc = MeanMetric()
        self.chance_acc = MeanMetric()

    def pipeline_parts(self) -> PipelineParts:
        return PipelineParts(
            encoder=self.encoder,
            embedding=self.embedding,
            blocks=list(self.blocks),
            head=self.head,
            text_targets=_text_targets,
            generator=self.generator,
            generator_targets=_generator_targets,
            eval_outputs=self.answer_outcomes,
            context=self.llm_context,
        )

    def llm_context(self, h: torch.Tensor, mb: dict[str, Any]) -> Context:
        """The LLM blocks' context of one microbatch: its ``segments`` (one per sample) and the rotary
        tables at its ``positions`` (restarting at 0 in each sample)."""
        return {"segments": mb["segments"], **rotary(mb["positions"], self.config.dim // self.config.heads)}

    def forward(self, mb: dict[str, Any]) -> torch.Tensor:
        """The last LLM stage's output ``h [S, D]`` of one microbatch: what head and generator read."""
        return run_blocks(self.blocks, self.embedding(mb, self.encoder(mb)), mb, self.llm_context)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = step_loss(self, batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, outcomes = step_loss(self, batch, with_outputs=True)
        self.log("val_loss", loss, prog_bar=True, batch_size=1)
        for outcome in outcomes:  # the same on every rank; the metrics reduce over replicas
            if outcome["correct"].numel():
                self.answer_acc.update(outcome["correct"])
                self.chance_acc.update(outcome["chance"])
        self.log("val_answer_acc", self.answer_acc, prog_bar=True)
        self.log("val_chance_acc", self.chance_acc)

    @torch.no_grad()
    def answer_outcomes(self, h: torch.Tensor, mb: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per asked question of one microbatch: ``correct`` (1.0 when every answer word is the argmax)
        and ``chance`` (1 / number of choices).

        ``h [S, D]`` is the hidden state the head receives (the head's norm and LM head are applied
        here, at the scored positions only); ``mb`` supplies ``labels``, ``scored``,
        ``segments`` and ``choices``. Runs where the head's parameters live (the last stage).
        """
        at = mb["scored"].nonzero().squeeze(1)
        wrong = (self.head.logits(h[at]).argmax(-1) != mb["labels"][at]).float()  # [A]
        choices = mb["choices"]  # [n]
        wrong_words = torch.zeros(len(choices), device=wrong.device).index_add(0, mb["segments"][at], wrong)
        asked = choices > 0
        return {"correct": (wrong_words[asked] == 0).float(), "chance": 1.0 / choices[asked].float()}

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        ramp = lambda step: min(1.0, (step + 1) / hp.warmup_steps)  # noqa: E731
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, ramp)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    @torch.no_grad()
    def generate_image(self, prompt: str, *, size: int = 32, steps: int = 16, seed: int = 0) -> np.ndarray:
        """Draw ``prompt`` (e.g. "draw a red circle") as a ``[size, size, 3]`` uint8 image.

        Integrates the flow from noise (t = 0) to an image (t = 1) with ``steps`` Euler steps; the LLM
        runs once, since the hidden states at the ``<gen>`` positions do not depend on the noise.
        """
        meta = {"kind": "draw", "prompt": prompt, "answer": "", "choices": 0}
        mb = collate([Record("generate", meta, outputs=[np.zeros((size, size, 3), np.uint8)])], self.config)
        mb = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        h = self(mb)[mb["tokens"] == GEN]  # [G, D]
        x = torch.randn(len(h), self.config.patch_dim, generator=torch.Generator().manual_seed(seed)).to(h)
        for i in range(steps):
            x = x + self.generator.velocity(h, x, torch.full((len(h),), i / steps, device=h.device)) / steps
        return unpatchify(x.cpu(), size, size, self.config.patch_size)
