"""The model contract: what the pipeline runtime needs from a multimodal LLM, in one place.

A model meets the runtime as a :class:`PipelineParts`: five modules and two counting functions.
``mb`` below is one microbatch's input pytree exactly as the data loader gives it; every rank of
a pipeline receives the whole step's microbatch list, so each part reads what it needs from it
(stage 0 the tokens, the last stage the labels, an owner the images and generator targets).

=================================  ===================================================================
``encoder(mb) -> enc``             runs on the microbatch's encoder owner; ``enc`` is any pytree of
                                   tensors (e.g. one ``[num_patches, dim]`` tensor per image)
``embedding(mb, enc) -> h``        stage 0: token embedding and merge of the encoder outputs; ``enc``
                                   is None in a step without encoder work
``blocks[i](h) -> h``              the LLM blocks the runtime splits into ``pp * vpp`` chunks; ``h`` is
                                   any pytree of tensors (a hidden state, or a tuple with rotary tables)
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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["LossWeights", "PipelineParts"]


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


@dataclass(frozen=True, kw_only=True)
class PipelineParts:
    """A multimodal LLM cut into the pieces the pipeline runtime places on ranks.

    ``embedding``, ``head`` and every block belong to the LLM (placed by partitioning, grads
    synchronised over the data-parallel group); ``encoder`` and ``generator`` are replicated on
    every rank (grads synchronised over all ``pp * dp`` ranks). Modules must be distinct objects
    and must not share parameters with each other (tied embeddings are not supported).
    """

    embedding: nn.Module
    """``embedding(mb, enc) -> h`` on stage 0."""
    blocks: Sequence[nn.Module]
    """LLM blocks in order, ``block(h) -> h``; split into ``pp * vpp`` contiguous chunks."""
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
        self._check_nothing_shared()

    def _check_nothing_shared(self) -> None:
        """Parts live on different ranks, and a rank frees the parts it does not own: a parameter,
        buffer or stateful submodule shared by two parts would be freed under the part that keeps it."""
        seen: dict[int, str] = {}
        for name, module in self.modules().items():
            for pname, p in module.named_parameters():
                other = seen.setdefault(id(p), f"{name}.{pname}")
                if other != f"{name}.{pname}":
                    raise ValueError(
                        f"parameter {name}.{pname} is also {other}: pipeline parts must not share "
                        "parameters (untie the embeddings or keep both uses in one part)"
                    )
        holders: dict[int, tuple[str, str]] = {}
        for name, module in self.modules().items():
            for buffer_name, buffer in module.named_buffers():
                path, _, leaf = f"{name}.{buffer_name}".rpartition(".")
                part, other = holders.setdefault(id(buffer), (name, path))
                if part != name:
                    kind = type(module.get_submodule(path[len(name) + 1 :])).__name__
                    raise ValueError(
                        f"module {path} ({kind}) is also {other}: its buffer {leaf} is shared by two "
                        "pipeline parts, which may live on different ranks (a rank frees the parts it "
                        "does not own, and would free it under the part it keeps). Give each part its "
                        "own copy (e.g. copy.deepcopy per block), or compute the values inside each part"
                    )

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
