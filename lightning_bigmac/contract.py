"""The model contract: how a LightningModule meets the BigMac strategy, documented in one place.

A module declares its pieces with one method and computes its loss with one function::

    class MyMLLM(L.LightningModule):
        def pipeline_parts(self) -> PipelineParts:        # which modules are what
            return PipelineParts(encoder=self.vit, embedding=self.embed, blocks=list(self.llm.blocks),
                                 head=self.lm_head, text_targets=count_text_targets,
                                 generator=self.gen_head, generator_targets=count_gen_targets,
                                 context=self.positions)    # optional: block(h, ctx) per stage

        def training_step(self, batch, batch_idx):
            loss = step_loss(self, batch)                 # the same line under every strategy
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", step_loss(self, batch), prog_bar=True)

:class:`~lightning_bigmac.runtime.parts.PipelineParts` says what each part computes, what the
optional stage context is and which parameters the embedding and the head may share. Under
``strategy="bigmac"``, :func:`step_loss` runs the whole step through the pipeline (forward and
backward when training, forward only otherwise) and returns the step's global loss, already
differentiated: the strategy tells Lightning to skip its own zero-grad and backward. Under any
other strategy it computes the same loss in this process with :func:`reference_loss`, a normal
differentiable tensor. The module trains unchanged with ``strategy="auto"``.

What a batch may be is described in :mod:`lightning_bigmac.batches`. A strategy that runs steps
through a pipeline implements :class:`PipelineStepRunner`; this module never imports the strategy.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch

from .batches import microbatches_of
from .runtime.parts import LossWeights, PipelineParts, run_blocks

__all__ = ["PipelineStepRunner", "check_contract", "reference_loss", "step_loss"]


class PipelineStepRunner(abc.ABC):
    """A strategy that computes a step's loss itself (forward and backward, over its pipeline).

    :func:`step_loss` hands such a strategy the whole batch; any other strategy gets the loss
    computed in this process.
    """

    @abc.abstractmethod
    def run_step(self, batch: Any) -> torch.Tensor:
        """Run one step of ``batch``; return its global loss (already differentiated when training)."""

    @abc.abstractmethod
    def last_eval_outputs(self) -> list[Any]:
        """``PipelineParts.eval_outputs`` of every microbatch of the last step (may be empty)."""


def check_contract(module: Any) -> PipelineParts:
    """The module's :class:`PipelineParts`, or a ``TypeError`` saying what is missing."""
    method = getattr(module, "pipeline_parts", None)
    if not callable(method):
        raise TypeError(
            f"{type(module).__name__} does not meet the BigMac model contract: define "
            "`def pipeline_parts(self) -> lightning_bigmac.PipelineParts` returning its encoder, LLM "
            "blocks, embedding, head and generator (see lightning_bigmac.contract)"
        )
    parts = method()
    if not isinstance(parts, PipelineParts):
        raise TypeError(
            f"{type(module).__name__}.pipeline_parts() returned {type(parts).__name__}, "
            "expected lightning_bigmac.PipelineParts"
        )
    return parts


def reference_loss(
    parts: PipelineParts,
    microbatches: Sequence[Any],
    *,
    weights: LossWeights | None = None,
    encoder: bool = True,
    generator: bool = True,
    eval_outputs: list[Any] | None = None,
) -> torch.Tensor:
    """The step loss computed in one process: the formula of :mod:`lightning_bigmac.runtime.parts`.

    ``text_weight * sum(text losses) / T + generator_weight * sum(generator losses) / G`` with ``T``
    and ``G`` the target counts of the whole step; a term with no targets adds 0. The blocks run
    as in one pipeline stage (:func:`~lightning_bigmac.runtime.parts.run_blocks`: one stage context
    per microbatch). Given a list as ``eval_outputs``, appends ``parts.eval_outputs(h, mb)`` of
    every microbatch to it.
    """
    w = weights or LossWeights()
    use_encoder = encoder and parts.encoder is not None
    use_generator = generator and parts.generator is not None
    text_n = sum(int(parts.text_targets(mb)) for mb in microbatches)
    gen_n = sum(int(parts.generator_targets(mb)) for mb in microbatches) if use_generator else 0
    text = gen = None
    for mb in microbatches:
        h = parts.embedding(mb, parts.encoder(mb) if use_encoder else None)
        h = run_blocks(parts.blocks, h, mb, parts.context)
        t = parts.head(h, mb)
        text = t if text is None else text + t
        if eval_outputs is not None and parts.eval_outputs is not None:
            eval_outputs.append(parts.eval_outputs(h, mb))
        if use_generator:
            g = parts.generator(h, mb)
            gen = g if gen is None else gen + g
    loss = text * (w.text / text_n) if text_n else text * 0.0
    if gen_n:
        loss = loss + gen * (w.generator / gen_n)
    return loss


def step_loss(module: Any, batch: Any, *, with_outputs: bool = False) -> Any:
    """The loss of one step of ``batch``: through the pipeline under ``BigMacStrategy``, else in-process.

    Call it from ``training_step``, ``validation_step`` and ``test_step``. Under the strategy the
    returned tensor is the global loss of the step (the same on every rank), already
    differentiated when training; log it with ``self.log`` as usual. ``with_outputs=True``
    returns ``(loss, outputs)``: ``PipelineParts.eval_outputs`` of every microbatch (in
    evaluation steps; an empty list in training or without that hook), the same on every rank,
    to update metrics with.
    """
    trainer = getattr(module, "_trainer", None)
    strategy = trainer.strategy if trainer is not None else None
    if isinstance(strategy, PipelineStepRunner):
        loss = strategy.run_step(batch)
        outputs = strategy.last_eval_outputs()
    else:
        outputs = [] if with_outputs and not module.training else None
        weights = getattr(module, "loss_weights", None)
        loss = reference_loss(
            check_contract(module), microbatches_of(batch), weights=weights, eval_outputs=outputs
        )
    return (loss, outputs or []) if with_outputs else loss
