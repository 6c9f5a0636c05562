"""Iterable wrapper for streams (webdataset, HF streaming, any generator) with a bounded buffer.

Every replica reads the *whole* stream and plans the global step (``dp_size * M`` microbatches)
the same way, then takes its own share, exactly like the map-style sampler. So every replica
yields the same number of steps, each with the same ``M``, and no sample is lost or repeated,
whatever the data: a replica with one step more than the others would hang the job at its next
collective, and a stream split by replica cannot rule that out (shards differ in size, samples
are skipped, packing density varies), so the stream is never split.

The price, paid for correctness: each replica reads and describes every element, ``dp_size``
times what a split stream would read and decode (with ``balancer.webdataset.decode_sample``, every
replica decodes every image), and plans every replica's samples (10-20 us per sample). Where that
reading is the bottleneck, write the descriptors once (an index) and use the map-style
:class:`~balancer.sampler.BalancedBatchSampler`, which reads only its own rows.

A *source* is ``source(epoch) -> Iterable``: the whole stream of epoch ``epoch``, in the same
order every time it is called and on every replica (resume re-reads it). It may yield
:class:`~balancer.steps.Skipped` for what it could not read; ``balancer.webdataset.webdataset_source``
reads tar shards. In Lightning, ``lightning_bigmac.data_state.StepLoader(stream, collate_fn=...)``
loads the steps, with the data position of the last trained step in checkpoints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from .config import BalancerConfig
from .steps import Adapter, Describe, StepPlanner

__all__ = ["BalancedStream", "Source"]

Source = Callable[[int], Iterable[Any]]
"""Epoch -> every element of the stream for that epoch; the same on every call and every replica."""


class BalancedStream(Adapter[Any]):
    """Yields this replica's :class:`~balancer.steps.StepBatch` of stream elements, step by step.

    ``describe(element) -> (item, Sample)`` decodes one element; it raises
    :class:`~balancer.steps.CorruptSample` for bad data, which is skipped and counted. It must be
    deterministic: every replica describes every element and must reach the same verdict. The
    steps carry the items ``describe`` returned.
    """

    def __init__(
        self,
        source: Source,
        config: BalancerConfig,
        *,
        describe: Describe,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in 0..dp_size-1 (dp_size={dp_size})")
        self.source = source
        planner = StepPlanner(config, replicas=dp_size, describe=describe, where=f"stream dp_rank {dp_rank}")
        super().__init__(planner, share=dp_rank)

    def _elements(self, epoch: int) -> Iterable[Any]:
        _check_single_worker()
        return self.source(epoch)


def _check_single_worker() -> None:
    """Several DataLoader workers would each replay the whole stream: refuse instead of duplicating."""
    torch_data = sys.modules.get("torch.utils.data")
    info = torch_data.get_worker_info() if torch_data is not None else None
    if info is not None and info.num_workers > 1:
        raise ValueError(
            f"BalancedStream runs in a DataLoader with num_workers={info.num_workers}: every worker would "
            "yield the whole stream. Use num_workers=1 (decoding then runs in that worker) or 0"
        )
