"""Data balancer for the BigMac nested pipeline: samples -> costs -> packed microbatches, groups, owners.

Usable without Lightning or torch: it needs numpy, and the schedule simulator of
``lightning_bigmac.schedule`` (pure Python) to judge a packing. See ``balancer/README.md``.
"""

import warnings

from .config import BalancerConfig
from .cost import Coefficients, Geometry, SampleCost, SampleCostModel, Term, fit_coefficients
from .packing import PackResult, StepPlan, pack
from .sampler import BalancedBatchSampler, StepDataset
from .samples import Sample
from .steps import CorruptSample, Skipped, SkippedSampleWarning, StepBatch
from .stream import BalancedStream, Source

__all__ = [
    "BalancedBatchSampler",
    "BalancedStream",
    "BalancerConfig",
    "Coefficients",
    "CorruptSample",
    "Geometry",
    "PackResult",
    "Sample",
    "SampleCost",
    "SampleCostModel",
    "Skipped",
    "SkippedSampleWarning",
    "Source",
    "StepBatch",
    "StepDataset",
    "StepPlan",
    "Term",
    "fit_coefficients",
    "pack",
]


def __getattr__(name: str) -> object:
    if name == "CostModel":  # a deprecated alias, kept for one release (CHANGELOG.md)
        warnings.warn(
            "balancer.CostModel is deprecated: use balancer.SampleCostModel", DeprecationWarning, stacklevel=2
        )
        return SampleCostModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
