"""What of Lightning's Trainer and of the model the strategy supports, checked before training.

Each check raises with the setting, the value seen and the fix, so a misconfigured run stops at
setup instead of training something other than what was asked for.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from .runtime.parts import PipelineParts
from .schedule import ScheduleConfig

__all__ = ["check_layout_fits", "check_trainer", "check_world_size"]


def check_world_size(pp: int, devices: int, num_nodes: int) -> None:
    """The world (``devices`` per node x ``num_nodes``) must be whole pipelines of ``pp`` ranks.

    Runs before any process is launched; the fix it names keeps ``num_nodes`` and changes the
    devices per node (the smallest count at least ``devices`` that makes whole pipelines).
    """
    world = devices * num_nodes
    if world % pp:
        fit = next(d for d in range(max(devices, 1), devices + pp + 1) if (d * num_nodes) % pp == 0)
        raise MisconfigurationException(
            f"BigMacStrategy(pipeline_parallel_size={pp}) needs a world size divisible by {pp}, but "
            f"devices x num_nodes = {world} ({devices} per node x {num_nodes}): use devices={fit} per node "
            f"(world {fit * num_nodes}) or a pipeline_parallel_size that divides {world}"
        )


def check_trainer(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    """Refuse Trainer settings that the pipeline runtime cannot honour."""
    scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
    if scaler is not None:
        # The runtime runs backward itself on unscaled losses; Lightning's MixedPrecision would then
        # unscale those gradients (divide them by the loss scale) and skip steps on its own inf check.
        raise MisconfigurationException(
            f"precision={trainer.precision!r} needs loss scaling (a GradScaler), which BigMacStrategy does "
            "not do: its pipeline runs the backward itself, so the gradients would reach the optimizer "
            "divided by the loss scale. Use precision='bf16-mixed' (same speed, no loss scaling) or '32-true'"
        )
    if trainer.accumulate_grad_batches != 1:
        raise MisconfigurationException(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported by BigMacStrategy: "
            "one optimizer step already runs `microbatches` microbatches; raise `microbatches` instead"
        )
    if not module.automatic_optimization:
        raise MisconfigurationException(
            "BigMacStrategy runs the backward itself and needs automatic optimization: remove "
            "`self.automatic_optimization = False` from the module"
        )


def check_layout_fits(parts: PipelineParts, config: ScheduleConfig) -> None:
    """Every one of the P x V stages needs at least one LLM block."""
    stages = config.pp * config.vpp
    if len(parts.blocks) < stages:
        raise ValueError(
            f"the model has {len(parts.blocks)} LLM blocks but pipeline_parallel_size x virtual_chunks = "
            f"{config.pp} x {config.vpp} = {stages} stages need at least one each: "
            "lower pipeline_parallel_size or virtual_chunks"
        )
