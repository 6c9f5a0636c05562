"""The baseline users run today: ``torch.distributed.pipelining`` with ``Schedule1F1B``, 2 stages.

The layout is torchtitan's and Megatron's for a multimodal LLM: stage 0 holds the encoder, the
embedding and the first LLM blocks; stage 1 the other blocks, the LM head and the generator,
whose losses the schedule's ``loss_fn`` computes. Where the blocks are cut is the ``split``
(the first block of stage 1): users of this layout move blocks off stage 0, which also runs the
encoder (torchtitan's custom split points, Megatron's ``--decoder-first-pipeline-num-layers``),
so the benchmark sweeps it. The stage modules wrap the very modules of a
:class:`~lightning_bigmac.testing.tiny_mllm.TinyMLLM`, so the weights and the per-part maths are
the model's own.

``PipelineStage`` fixes the shapes it *sends* at its first step, so the hidden sequence stage 0
sends is padded to the step's most images and longest text (what its users do). Stage 0
receives its microbatch from the schedule with the real counts beside it, so it runs the encoder
on the real images only and pads afterwards; the LLM blocks pay for the padded positions, which
is inherent to static shapes. The padding (zeros) goes *behind* the real positions of the
sequence (``[images, text, padding]``): under causal attention no real position sees a padded
one, so the loss equals the unpadded model's exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from lightning_bigmac.runtime import LossWeights
from lightning_bigmac.testing.tiny_mllm import TinyMLLM

__all__ = [
    "FirstStage",
    "LastStage",
    "PaddedStep",
    "TorchPipelineSetup",
    "even_split",
    "pad_step",
    "stage_modules",
]

Microbatch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PaddedStep:
    """One step's microbatches stacked on a leading microbatch dimension, padded to the largest."""

    images: torch.Tensor
    """``[M, n_max, patches, patch_dim]``; padded images are zeros (the encoder never sees them)."""
    tokens: torch.Tensor
    """``[M, S_max]``; padded tokens are 0."""
    counts: torch.Tensor
    """``[M, 2]`` int64: real images and real text tokens of each microbatch."""

    @property
    def shape_key(self) -> tuple[int, int]:
        """What fixes the stages' message shapes: ``(n_max, S_max)``."""
        return self.images.shape[1], self.tokens.shape[1]


def pad_step(microbatches: Sequence[Microbatch]) -> PaddedStep:
    """Pad every microbatch to the step's most images and longest text."""
    n_max = max(mb["images"].shape[0] for mb in microbatches)
    s_max = max(mb["tokens"].shape[0] for mb in microbatches)
    _, patches, patch_dim = microbatches[0]["images"].shape
    images = torch.zeros(len(microbatches), n_max, patches, patch_dim)
    tokens = torch.zeros(len(microbatches), s_max, dtype=torch.int64)
    for j, mb in enumerate(microbatches):
        images[j, : mb["images"].shape[0]] = mb["images"]
        tokens[j, : mb["tokens"].shape[0]] = mb["tokens"]
    counts = torch.tensor([[mb["images"].shape[0], mb["tokens"].shape[0]] for mb in microbatches])
    return PaddedStep(images, tokens, counts)


def _blocks(h: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
    for block in blocks:
        h = block(h)
    return h


class FirstStage(nn.Module):
    """Encoder + embedding + the first LLM blocks; one microbatch (leading dimension 1) per call."""

    def __init__(self, model: TinyMLLM, split: int):
        super().__init__()
        self.encoder, self.embedding = model.encoder, model.embedding
        self.blocks = nn.ModuleList(model.blocks[:split])

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n, s = (int(c) for c in counts[0])
        features = self.encoder({"images": images[0, :n]})["features"]  # the real images only
        real = self.embedding({"tokens": tokens[0, :s]}, {"features": features})  # [n*patches + s, D]
        length = images.shape[1] * images.shape[2] + tokens.shape[1]  # what every microbatch sends
        padding = real.new_zeros(length - real.shape[0], real.shape[1])
        return _blocks(torch.cat([real, padding]), self.blocks).unsqueeze(0)  # [1, L_max, D]


class LastStage(nn.Module):
    """The remaining LLM blocks; :meth:`loss` runs head and generator on the real positions."""

    def __init__(self, model: TinyMLLM, split: int):
        super().__init__()
        self.blocks = nn.ModuleList(model.blocks[split:])
        self.head, self.generator = model.head, model.generator

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _blocks(h, self.blocks)

    def loss(self, h: torch.Tensor, mb: Microbatch, text_targets: int, gen_targets: int) -> torch.Tensor:
        """The runtime's loss formula for one microbatch: sums scaled by the step's target counts."""
        weights = LossWeights()
        real = h[0, : mb["images"].shape[0] * mb["images"].shape[1] + mb["tokens"].shape[0]]
        loss = self.head(real, mb) * (weights.text / max(text_targets, 1))
        return loss + self.generator(real, mb) * (weights.generator / max(gen_targets, 1))


def even_split(blocks: int) -> int:
    """The first block of stage 1 when ``blocks`` LLM blocks are cut in half (the untuned ``pp=2`` split)."""
    return blocks // 2


def stage_modules(model: TinyMLLM, split: int | None = None) -> tuple[FirstStage, LastStage]:
    """Both stages of ``model``, stage 1 starting at block ``split`` (default: :func:`even_split`)."""
    split = even_split(len(model.blocks)) if split is None else split
    if not 0 < split < len(model.blocks):
        raise ValueError(f"split={split} must leave each stage a block: 1..{len(model.blocks) - 1}")
    return FirstStage(model, split), LastStage(model, split)


def step_targets(model: TinyMLLM, microbatches: Sequence[Microbatch]) -> tuple[int, int]:
    """Text and generator targets of a step, counted as the runtime counts them."""
    parts = model.parts()
    assert parts.generator_targets is not None
    text = sum(parts.text_targets(mb) for mb in microbatches)
    return text, sum(parts.generator_targets(mb) for mb in microbatches)


class TorchPipelineSetup:
    """One rank of the 2-stage ``Schedule1F1B`` pipeline over a list of steps' microbatches.

    A ``PipelineStage`` and its schedule are built per padded shape (the stage infers its message
    shapes once) and reused whenever a step pads to that shape again. ``split``: the first block of
    stage 1 (default: half the blocks).
    """

    def __init__(
        self,
        model: TinyMLLM,
        steps: Sequence[Sequence[Microbatch]],
        *,
        lr: float,
        split: int | None = None,
    ):
        self.model, self.steps = model, [list(s) for s in steps]
        self.rank = dist.get_rank()
        first, last = stage_modules(model, split)
        self.module = first if self.rank == 0 else last
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=lr)
        self.padded = [pad_step(s) for s in self.steps]
        self.targets = [step_targets(model, s) for s in self.steps]
        self._schedules: dict[tuple[int, int], Schedule1F1B] = {}
        self._current = 0

    def _loss_fn(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.module, LastStage)
        mb = self.steps[self._current][int(index)]
        return self.module.loss(h, mb, *self.targets[self._current])

    def _schedule(self, key: tuple[int, int], microbatches: int) -> Schedule1F1B:
        if key not in self._schedules:
            stage = PipelineStage(self.module, self.rank, 2, torch.device("cpu"))
            self._schedules[key] = Schedule1F1B(stage, microbatches, loss_fn=self._loss_fn, scale_grads=False)
        return self._schedules[key]

    def step(self, k: int) -> float:
        """One optimizer step on step ``k``'s microbatches; returns the step's loss on every rank."""
        self._current = k
        padded = self.padded[k]
        schedule = self._schedule(padded.shape_key, len(self.steps[k]))
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), dtype=torch.float64)
        if self.rank == 0:
            schedule.step(padded.images, padded.tokens, padded.counts)
        else:
            losses: list[torch.Tensor] = []
            schedule.step(target=torch.arange(len(self.steps[k])), losses=losses)
            loss += sum(float(x.detach()) for x in losses)
        self.optimizer.step()
        dist.all_reduce(loss)
        return float(loss)
