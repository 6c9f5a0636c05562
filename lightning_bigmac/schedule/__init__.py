"""Schedules as data: plans, builders, the validator, the simulator and pictures.

Pure Python: nothing here imports torch or torch.distributed, so plans can be built, checked
and drawn anywhere (tests, the ``bigmac plan`` CLI, a notebook) before a process group exists.
"""

import warnings

from .builders import build_plan
from .config import SCHEDULES, ScheduleConfig
from .costs import OpCosts
from .dataflow import DataFlow, stage_of
from .engine import Deadlock, Interval
from .plan import Op, Plan, PlanFormatError
from .simulate import Simulation, lower_bound, simulate
from .validate import PlanError, validate

__all__ = [
    "SCHEDULES",
    "DataFlow",
    "Deadlock",
    "Interval",
    "Op",
    "OpCosts",
    "Plan",
    "PlanError",
    "PlanFormatError",
    "ScheduleConfig",
    "Simulation",
    "build_plan",
    "lower_bound",
    "simulate",
    "stage_of",
    "validate",
]


def __getattr__(name: str) -> object:
    if name == "CostModel":  # a deprecated alias, kept for one release (CHANGELOG.md)
        warnings.warn(
            "lightning_bigmac.schedule.CostModel is deprecated: use lightning_bigmac.schedule.OpCosts",
            DeprecationWarning,
            stacklevel=2,
        )
        return OpCosts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
