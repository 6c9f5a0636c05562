"""Schedules as data: plans, builders, the validator, the simulator and pictures.

Pure Python: nothing here imports torch or torch.distributed, so plans can be built, checked
and drawn anywhere (tests, the ``bigmac plan`` CLI, a notebook) before a process group exists.
"""

from .builders import build_plan
from .config import SCHEDULES, ScheduleConfig
from .costs import CostModel
from .dataflow import DataFlow, stage_of
from .engine import Deadlock, Interval
from .plan import Op, Plan, PlanFormatError
from .simulate import Simulation, lower_bound, simulate
from .validate import PlanError, validate

__all__ = [
    "SCHEDULES",
    "CostModel",
    "DataFlow",
    "Deadlock",
    "Interval",
    "Op",
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
