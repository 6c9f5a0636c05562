"""A sharded checkpoint as one ordinary Lightning checkpoint, for one process without the strategy.

:func:`consolidate` (``bigmac consolidate DIR OUT.ckpt``) writes what a one-process Lightning run
would have saved at the same step: every weight under the module's names, the optimizer state
numbered as that run's ``optimizer.state_dict()`` numbers it, and the loops, callbacks, schedulers
and hyper-parameters. So ``MyModule.load_from_checkpoint(OUT)`` reads the weights and
``Trainer(strategy="auto").fit(model, ckpt_path=OUT)`` resumes the training.
:class:`ShardedCheckpointIO` lets a one-process Trainer resume from the directory itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from . import files, optim_by_name, sharded

__all__ = ["ShardedCheckpointIO", "consolidate"]


def consolidate(
    path: str | Path, out: str | Path | None = None, weights_only: bool = False
) -> dict[str, Any]:
    """Merge the sharded checkpoint at ``path`` into one ordinary Lightning checkpoint dict; write it
    to ``out`` (atomically) when given. Reads every tensor into this process's memory."""
    full = sharded.read_full(Path(path), weights_only)
    full.pop("bigmac")
    if "optimizer_states" in full:
        full["optimizer_states"] = [optim_by_name.to_positions(s) for s in full["optimizer_states"]]
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        files.write_atomically(full, Path(out))
    return full


class ShardedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO that also reads BigMac checkpoint directories (consolidated in memory).

    ``Trainer(strategy="auto", plugins=[ShardedCheckpointIO()]).fit(model, ckpt_path="last.ckpt")``
    resumes a pipeline run in one process; saving is Lightning's ordinary one-file checkpoint.
    """

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if files.is_sharded(path):
            return consolidate(path, weights_only=bool(weights_only))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
