"""The warning for the sampler Lightning injects: under ``bigmac`` it shuffles the training data.

``BigMacStrategy`` is distributed, so with ``Trainer(use_distributed_sampler=True)`` (the default)
Lightning replaces a training ``DataLoader``'s sampler with a ``DistributedSampler(shuffle=True)``
over the data-parallel replicas, even for a single replica. A one-process ``strategy="auto"`` run
keeps the loader's own sampler, so the same module and data would see another order there, and
"trains unchanged with ``auto``" would not hold. The hook runs where Lightning hands the strategy
each loader it has prepared.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DistributedSampler

__all__ = ["warn_if_sampler_shuffles"]

MESSAGE = (
    "BigMacStrategy: the training DataLoader's sampler is a DistributedSampler that shuffles (with "
    "Trainer(use_distributed_sampler=True), the default, Lightning injects one); a one-process "
    "strategy='auto' run keeps the loader's own sampler, so the two runs see the data in different "
    "orders. To keep the loader's order, pass Trainer(use_distributed_sampler=False) and split by "
    "data-parallel replica with a sampler of your own: DistributedSampler(dataset, shuffle=False, "
    "**trainer.strategy.distributed_sampler_kwargs), or the balancer's BalancedBatchSampler / BalancedStream"
)


def warn_if_sampler_shuffles(strategy: Any, dataloader: object) -> object:
    """``BigMacStrategy.process_dataloader``: warn on rank 0 when the training data gets shuffled."""
    trainer = strategy.lightning_module.trainer
    sampler = getattr(dataloader, "sampler", None)
    injects = trainer._accelerator_connector.use_distributed_sampler  # no public accessor in Lightning 2.6
    if trainer.training and injects and isinstance(sampler, DistributedSampler) and sampler.shuffle:
        rank_zero_warn(MESSAGE)
    return dataloader
