"""The model contract: what the pipeline runtime needs from a multimodal LLM, in one place.

A model meets the runtime as a :class:`PipelineParts`: five modules, an optional stage context and
two counting functions. ``mb`` below is one microbatch's input pytree exactly as the data loader
gives it; every rank of a pipeline receives the whole step's microbatch list, so each part reads
what it needs from it (stage 0 the tokens, the last stage the labels, an owner the images and
generator targets).

=================================  ===================================================================
``encoder(mb) -> enc``             runs on the microbatch's encoder owner; ``enc`` is any pytree of
                                   tensors (e.g. one ``[num_patches, dim]`` tensor per image)
``embedding(mb, enc) -> h``        stage 0: token embedding and merge of the encoder outputs; ``enc``
                                   is None in a step without encoder work
``context(h, mb) -> ctx``          optional; built once per stage and microbatch before the stage's
                                   first block, from the ``h`` entering it (for its dtype and device)
                                   and ``mb``: position ids, attention masks, rotary tables
``blocks[i](h) -> h``              the LLM blocks the runtime splits into ``pp * vpp`` chunks; ``h`` is
                                   any pytree of tensors; ``blocks[i](h, ctx) -> h`` with a context
``head(h, mb) -> loss_sum``        last stage: final norm, LM head, text loss *summed* over targets
``generator(h, mb) -> loss_sum``   on the generator owner, from the last stage's ``h``: loss summed
                                   over the generator targets
``text_targets(mb) -> int``        how many text targets ``mb`` has (computed from inputs alone)
``generator_targets(mb) -> int``   how many generator targets ``mb`` has
=================================  ===================================================================

The step's loss is ``text_weight * sum(head) / T + generator_weight * sum(generator) / G`` with
``T`` and ``G`` the target counts of the whole step over all data-parallel replicas, so its
gradients equal one big batch's. That is why the parts return sums and the counts come from the
inputs: the runtime must know ``T`` and ``G`` before the first backward. A term whose count is 0
(a text-only step has no generator targets) contributes 0.

The context keeps what every block derives from the microbatch out of the hidden state that
crosses stages: each stage rebuilds it from ``mb``, which every rank has. It holds no trainable
state (an ``nn.Module`` context is placed on every rank and never freed). :func:`run_blocks` is the
one rule for calling blocks, shared by the pipeline's stages and the one-process reference.

Parts may not share parameters or buffers, with one exception: ``embedding`` and ``head`` may
share parameters (tied embeddings, e.g. ``lm_head.weight is embed_tokens.weight``). The runtime
then holds the tied parameter on the first and the last stage's ranks, equal at setup and after
every step (:attr:`PipelineParts.tied`).

Parts may be created on the meta device: a rank allocates only the parts it holds, and gives them
values with ``reset_parameters()``, or with :attr:`PipelineParts.fill_part` when given (e.g. a
checkpoint's tensors, read per rank), so no process ever holds the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["LossWeights", "PipelineParts", "run_blocks"]


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    """Weights of the two loss terms of a step (see the module docstring for the formula)."""

    text: float = 1.0
    """Weight of the text loss (mean over all text targets of the step)."""
    generator: float = 1.0
    """Weight of the generator loss (mean over all generator targets of the step)."""

    def replace_some(self, text: float | None = None, generator: float | None = None) -> LossWeights:
        """These weights with ``text`` and/or ``generator`` replaced where given (not None)."""
        return LossWeights(
            text=self.text if text is None else text,
            generator=self.generator if generator is None else generator,
        )


def run_blocks(
    blocks: Sequence[nn.Module], h: Any, mb: Any, context: Callable[[Any, Any], Any] | None
) -> Any:
    """``h`` through ``blocks`` in order: ``block(h)``, or ``block(h, ctx)`` with ``ctx = context(h, mb)``
    built once. A pipeline stage calls it on its blocks, the one-process reference on all of them."""
    if context is None:
        for block in blocks:
            h = block(h)
        return h
    ctx = context(h, mb)
    for block in blocks:
        h = block(h, ctx)
    return h


@dataclass(frozen=True, kw_only=True)
class PipelineParts:
    """A multimodal LLM cut into the pieces the pipeline runtime places on ranks.

    ``embedding``, ``head`` and every block belong to the LLM (placed by partitioning, grads
    synchronised over the data-parallel group); ``encoder`` and ``generator`` are replicated on
    every rank (grads synchronised over all ``pp * dp`` ranks), and so is an ``nn.Module``
    ``context`` (which has nothing to train). Modules must be distinct objects and must not share
    parameters or buffers with each other, except parameters shared by ``embedding`` and ``head``
    (tied embeddings, listed in :attr:`tied`).
    """

    embedding: nn.Module
    """``embedding(mb, enc) -> h`` on stage 0."""
    blocks: Sequence[nn.Module]
    """LLM blocks in order, ``block(h) -> h`` (``block(h, ctx) -> h`` with a ``context``); split into
    ``pp * vpp`` contiguous chunks."""
    head: nn.Module
    """``head(h, mb) -> text loss sum`` (a 0-dim tensor) on the last stage."""
    text_targets: Callable[[Any], int]
    """Number of text targets of a microbatch, from its inputs."""
    encoder: nn.Module | None = None
    """``encoder(mb) -> pytree of tensors`` on the microbatch's encoder owner; None: text-only model."""
    generator: nn.Module | None = None
    """``generator(h, mb) -> generator loss sum`` on the microbatch's generator owner."""
    generator_targets: Callable[[Any], int] | None = None
    """Number of generator targets of a microbatch; required with a generator."""
    eval_outputs: Callable[[Any, Any], Any] | None = None
    """``eval_outputs(h, mb) -> pytree`` on the last stage in evaluation steps, from the last
    block's output (e.g. predictions and labels for a metric); every rank of the pipeline gets
    the list of them, one per microbatch."""
    context: Callable[[Any, Any], Any] | None = None
    """``context(h, mb) -> ctx``, built once per stage and microbatch and passed to each of the
    stage's blocks (see :func:`run_blocks`); an ``nn.Module`` context must have no trainable
    parameters (its buffers, e.g. rotary ``inv_freq``, live on every rank)."""
    fill_part: Callable[[nn.Module], None] | None = None
    """``fill_part(part)`` gives a part created on the meta device its values once the runtime has
    allocated it on the rank that owns it (``to_empty``), instead of ``reset_parameters()``: e.g.
    :meth:`lightning_bigmac.hf.weights.PretrainedWeights.fill` reads the part's tensors from a
    checkpoint, so a rank reads only what it holds. It must also set the part's buffers."""
    tied: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)
    """``(name in embedding, name in head)`` of every parameter the two share (tied embeddings),
    read when the parts are made: placing the stages breaks the identity on ranks that free one
    of the two."""

    def __post_init__(self) -> None:
        named = {
            "embedding": self.embedding,
            "head": self.head,
            "encoder": self.encoder,
            "generator": self.generator,
        }
        for name, module in named.items():
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"PipelineParts.{name} must be an nn.Module, got {type(module).__name__}")
        if len(self.blocks) == 0:
            raise ValueError(
                "PipelineParts.blocks is empty: give the LLM blocks the pipeline splits into stages"
            )
        for i, block in enumerate(self.blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"PipelineParts.blocks[{i}] must be an nn.Module, got {type(block).__name__}")
        if self.generator is not None and self.generator_targets is None:
            raise ValueError(
                "PipelineParts.generator is set but generator_targets is None: give a function "
                "mb -> number of generator targets so the runtime can scale the generator loss"
            )
        if self.context is not None and not callable(self.context):
            raise TypeError(f"PipelineParts.context must be callable, got {type(self.context).__name__}")
        if isinstance(self.context, nn.Module):
            trainable = [n for n, p in self.context.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(
                    f"PipelineParts.context has trainable parameters {trainable[:3]}: the context is "
                    "rebuilt on every stage and its gradients are not synchronised, so it must hold "
                    "no trainable state. Move them into a block or the embedding, or freeze them "
                    "(requires_grad_(False))"
                )
        object.__setattr__(self, "tied", self._check_sharing())

    def _check_sharing(self) -> tuple[tuple[str, str], ...]:
        """The tied ``(embedding, head)`` parameter names; refuses any other sharing. Parts live on
        different ranks, and a rank frees the parts it does not own: a parameter, buffer or stateful
        submodule shared by two parts would be freed under the part that keeps it. The runtime
        keeps tied embedding parameters alive on both ranks that hold one of the two parts."""
        seen: dict[int, str] = {}
        tied: list[tuple[str, str]] = []
        for name, module in self._all_modules().items():
            for pname, p in module.named_parameters():
                other = seen.setdefault(id(p), f"{name}.{pname}")
                if other == f"{name}.{pname}":
                    continue
                if name == "head" and other.startswith("embedding."):
                    tied.append((other[len("embedding.") :], pname))
                    continue
                raise ValueError(
                    f"parameter {name}.{pname} is also {other}: pipeline parts must not share "
                    "parameters (only the embedding and the head may: tied embeddings; keep both "
                    "uses in one part or give each its own copy)"
                )
        holders: dict[int, tuple[str, str]] = {}
        for name, module in self._all_modules().items():
            for buffer_name, buffer in module.named_buffers():
                path, _, leaf = f"{name}.{buffer_name}".rpartition(".")
                part, other = holders.setdefault(id(buffer), (name, path))
                if part != name:
                    inner = path[len(name) + 1 :]
                    kind = type(module.get_submodule(inner) if inner else module).__name__
                    raise ValueError(
                        f"module {path} ({kind}) is also {other}: its buffer {leaf} is shared by two "
                        "pipeline parts, which may live on different ranks (a rank frees the parts it "
                        "does not own, and would free it under the part it keeps). Give each part its "
                        "own copy (e.g. copy.deepcopy per block), or compute the values inside each part"
                    )
        return tuple(tied)

    def _all_modules(self) -> dict[str, nn.Module]:
        """:meth:`modules` and an ``nn.Module`` context, as ``context``: what sharing is checked over."""
        out = self.modules()
        if isinstance(self.context, nn.Module):
            out["context"] = self.context
        return out

    def modules(self) -> dict[str, nn.Module]:
        """Every part by name: ``embedding``, ``blocks.<i>``, ``head``, ``encoder``, ``generator``."""
        out: dict[str, nn.Module] = {"embedding": self.embedding}
        out.update({f"blocks.{i}": b for i, b in enumerate(self.blocks)})
        out["head"] = self.head
        if self.encoder is not None:
            out["encoder"] = self.encoder
        if self.generator is not None:
            out["generator"] = self.generator
        return out
