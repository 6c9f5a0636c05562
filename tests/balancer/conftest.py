"""Small seeded multimodal descriptor sets for the adapter tests."""

import random

import pytest

from balancer import BalancerConfig, Sample


def mixed_samples(n: int, seed: int = 0, prefix: str = "s") -> list[Sample]:
    """Text-only, single-image, multi-image and video samples, a few hundred tokens each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        text = rng.randint(20, 600)
        key = f"{prefix}{i:05d}"
        if kind < 0.15:
            out.append(Sample(key=key, text_tokens=text))
        elif kind < 0.65:
            out.append(
                Sample(key=key, text_tokens=text, images=((rng.randint(224, 896), rng.randint(224, 896)),))
            )
        elif kind < 0.85:
            images = tuple((rng.randint(224, 448), rng.randint(224, 448)) for _ in range(rng.randint(2, 4)))
            out.append(Sample(key=key, text_tokens=text, images=images))
        else:
            out.append(Sample(key=key, text_tokens=text, videos=((rng.randint(4, 16), 224, 224),)))
    return out


@pytest.fixture
def mix():
    """``mix(n, seed=0, prefix="s")``: seeded mixed descriptors."""
    return mixed_samples


@pytest.fixture
def config() -> BalancerConfig:
    """P=2, M=4, a cap that holds a few samples per microbatch."""
    return BalancerConfig(pipeline_size=2, microbatches=4, token_cap=4096)
