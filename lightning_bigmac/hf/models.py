"""Which Hugging Face model classes the adapter supports, and the one function that dispatches on them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from lightning_bigmac.runtime.parts import PipelineParts

from .llava import llava_parts
from .qwen2_vl import qwen2_vl_parts

__all__ = ["SUPPORTED_MODELS", "hf_pipeline_parts", "model_from_config"]

_ADAPTERS: dict[type, Callable[..., PipelineParts]] = {
    LlavaForConditionalGeneration: llava_parts,
    Qwen2VLForConditionalGeneration: qwen2_vl_parts,
    Qwen2_5_VLForConditionalGeneration: qwen2_vl_parts,
}
_FROM_CONFIG: dict[type, type] = {
    LlavaConfig: LlavaForConditionalGeneration,
    Qwen2VLConfig: Qwen2VLForConditionalGeneration,
    Qwen2_5_VLConfig: Qwen2_5_VLForConditionalGeneration,
}

SUPPORTED_MODELS: tuple[str, ...] = tuple(cls.__name__ for cls in _ADAPTERS)
"""Names of the transformers classes :func:`hf_pipeline_parts` takes."""


def _unsupported(what: str) -> TypeError:
    return TypeError(
        f"{what} is not supported by lightning_bigmac.hf (supported: {', '.join(SUPPORTED_MODELS)}). "
        "For another model, write `pipeline_parts()` by hand on your LightningModule: see "
        "lightning_bigmac.contract and docs/hf.md ('Another model')"
    )


def hf_pipeline_parts(model: nn.Module) -> PipelineParts:
    """The :class:`~lightning_bigmac.PipelineParts` of a supported transformers VLM instance.

    The parts reference the model's own submodules (nothing is copied): training them trains
    ``model``. A class outside :data:`SUPPORTED_MODELS` gets a ``TypeError``.
    """
    adapter = _ADAPTERS.get(type(model))
    if adapter is None:
        raise _unsupported(f"{type(model).__name__}")
    return adapter(model)


def model_from_config(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised model of a supported family from its config (no download)."""
    cls = _FROM_CONFIG.get(type(config))
    if cls is None:
        raise _unsupported(f"a model for {type(config).__name__}")
    return cls(config)
