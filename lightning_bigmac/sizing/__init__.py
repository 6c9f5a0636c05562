"""Will it fit? Per-rank memory of a model on a pipeline layout, estimated before any device is used.

:func:`estimate_fit` combines a model's sizes (:class:`ModelSpec`, written out, the paper's
:data:`PAPER_MODEL`, or :func:`~lightning_bigmac.sizing.hf_sizes.spec_from_hf` from a transformers
config), one microbatch's token counts (:class:`Workload`), a layout (schedule, P, V, D, M) and
:class:`MemoryOptions` (precision, ZeRO-style shard level and recompute per part) into each rank's
weights, gradients, optimizer states, saved activations (the plan's simulated peaks) and transfer
buffers. ``bigmac fit`` is its command line; docs/scaling.md walks through the paper's setting.
"""

from .estimate import GIB, PRECISION_BYTES, SHARD_LEVELS, FitEstimate, MemoryOptions, RankMemory, estimate_fit
from .plan_memory import transport_peaks, weighted_peaks
from .spec import PAPER_MODEL, PAPER_WORKLOAD, LLMSpec, ModelSpec, PartSpec, Workload, parse_count

__all__ = [
    "GIB",
    "PAPER_MODEL",
    "PAPER_WORKLOAD",
    "PRECISION_BYTES",
    "SHARD_LEVELS",
    "FitEstimate",
    "LLMSpec",
    "MemoryOptions",
    "ModelSpec",
    "PartSpec",
    "RankMemory",
    "Workload",
    "estimate_fit",
    "parse_count",
    "transport_peaks",
    "weighted_peaks",
]
