"""Hugging Face VLMs under ``strategy="bigmac"`` with no user glue (docs/hf.md).

:class:`HFVLMModule` wraps a supported transformers model (or its config) in a LightningModule
that meets the model contract; :class:`PretrainedVLMModule` starts it from a ``save_pretrained``
directory, each rank reading only its stages; :func:`export_pretrained` writes a trained run back
as one. :class:`SampleBuilder` turns conversations into balancer samples and model inputs through
the model's processor. :func:`hf_pipeline_parts` gives the :class:`~lightning_bigmac.PipelineParts`
of a supported model for a LightningModule of your own; :func:`decoder_parts` builds the parts of
another model with the same language-model layout from three family functions.
"""

from .data import SUPPORTED_PROCESSORS, SampleBuilder
from .decoder import LayerInputs, decoder_parts
from .export import export_pretrained
from .models import SUPPORTED_MODELS, hf_pipeline_parts, model_from_config
from .module import HFVLMModule
from .pretrained import PretrainedVLMModule
from .weights import PretrainedWeights

__all__ = [
    "SUPPORTED_MODELS",
    "SUPPORTED_PROCESSORS",
    "HFVLMModule",
    "LayerInputs",
    "PretrainedVLMModule",
    "PretrainedWeights",
    "SampleBuilder",
    "decoder_parts",
    "export_pretrained",
    "hf_pipeline_parts",
    "model_from_config",
]
