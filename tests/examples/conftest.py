"""Shared fixtures for the example MLLM: a tiny model config and a tiny generated dataset."""

from __future__ import annotations

import pytest

from examples.mllm import DataConfig, ModelConfig


@pytest.fixture
def tiny_model() -> ModelConfig:
    """A model small enough that a training step takes milliseconds; the data's geometry is the default."""
    return ModelConfig(
        encoder_dim=32, encoder_layers=1, encoder_heads=2, dim=32, layers=2, heads=2, generator_dim=32
    )


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One cache directory for the session: each test's sources and splits are generated once."""
    return str(tmp_path_factory.mktemp("mllm-data"))


@pytest.fixture
def tiny_data(data_root: str) -> DataConfig:
    return DataConfig(
        root=data_root, train_samples=24, val_samples=8, samples_per_shard=8, microbatches=2, token_cap=160
    )
