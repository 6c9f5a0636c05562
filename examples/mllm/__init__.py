"""A small but real multimodal LLM for the BigMac strategy, and the data it learns from.

``ExampleMLLM`` (ViT at native resolution, projector, decoder LLM, flow-matching image head) meets
the model contract and trains under ``strategy="auto"`` and ``strategy="bigmac"``;
``ExampleDataModule`` generates its data on first use (synthetic shapes and scikit-image's bundled
photographs, cached as webdataset shards) and packs it with the balancer.
"""

from .config import DataConfig, ModelConfig
from .data import ExampleDataModule
from .model import ExampleMLLM

__all__ = ["DataConfig", "ExampleDataModule", "ExampleMLLM", "ModelConfig"]
