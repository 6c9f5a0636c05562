"""The pipeline runtime: process groups, partitioning, transfers, the executor, gradient sync,
profiling and activation accounting. See :mod:`.parts` for the model contract and
:class:`.executor.PipelineExecutor` for the entry point.
"""

from .executor import PipelineExecutor, StepResult
from .grad_sync import all_reduce_grads
from .groups import PipelineGroups, global_rank, layout
from .memory import ActivationMeter
from .partition import Partition, Stage, balanced_bounds, partition, place
from .parts import LossWeights, PipelineParts
from .profiler import (
    OpEvent,
    OpProfiler,
    chrome_trace,
    cost_profile,
    measured_simulation,
    planning_costs,
    transfer_latency,
)
from .routes import Message, Routes
from .transfer import PeerError, Transport

__all__ = [
    "ActivationMeter",
    "LossWeights",
    "Message",
    "OpEvent",
    "OpProfiler",
    "Partition",
    "PeerError",
    "PipelineExecutor",
    "PipelineGroups",
    "PipelineParts",
    "Routes",
    "Stage",
    "StepResult",
    "Transport",
    "all_reduce_grads",
    "balanced_bounds",
    "chrome_trace",
    "cost_profile",
    "global_rank",
    "layout",
    "measured_simulation",
    "partition",
    "place",
    "planning_costs",
    "transfer_latency",
]
