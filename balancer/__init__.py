"""Data balancer for the BigMac nested pipeline: samples -> costs -> packed microbatches, groups, owners.

Usable without Lightning or torch: it needs numpy, and the schedule simulator of
``lightning_bigmac.schedule`` (pure Python) to judge a packing. See ``balancer/README.md``.
"""

from .config import BalancerConfig
from .cost import Coefficients, CostModel, Geometry, SampleCost, Term, fit_coefficients
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
    "CostModel",
    "Geometry",
    "PackResult",
    "Sample",
    "SampleCost",
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
