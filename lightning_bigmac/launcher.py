"""The spawn/fork launcher for notebooks: hands the whole trained model back, not rank 0's stages.

Lightning's multiprocessing launcher returns rank 0's state dict to the main process. Under a
pipeline, rank 0 holds only its own stages (the rest were freed), so before that hand-over the
launcher gathers every stage's parameters onto rank 0 (a collective over the first pipeline).
Loading them by assignment makes a new parameter per name, so parameters that were one object
under several names (tied embeddings) are made one object again.

Lightning's main process copies the returned state dict into its module, which does nothing to a
module built on the meta device (``PretrainedVLMModule`` reads its weights only in the ranks). Such
a module gets the tensors by assignment instead, with the buffers a state dict leaves out
(non-persistent ones, e.g. rotary frequencies) that rank 0 holds sent along; a non-persistent
buffer only another rank holds stays on the meta device.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from .runtime.aliases import parameter_aliases, retie

__all__ = ["GatheringLauncher"]


class GatheringLauncher(_MultiProcessingLauncher):
    @override
    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> Any:
        if trainer.state.fn == TrainerFn.FITTING:
            full = self._strategy.full_state_dict()
            if full is not None:  # rank 0: materialise the stages it had freed
                _assign(trainer.lightning_module, full)
        return super()._collect_rank_zero_results(trainer, results)

    @override
    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        module = trainer.lightning_module
        saved = module.state_dict().keys()
        unsaved = {n: b.cpu() for n, b in module.named_buffers() if n not in saved and not b.is_meta}
        buffer = io.BytesIO()
        torch.save(unsaved, buffer)
        return {**extra, "unsaved_buffers_bytes": buffer.getvalue()}

    @override
    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer: Any) -> None:
        module = trainer.lightning_module
        on_meta = any(t.is_meta for t in (*module.parameters(), *module.buffers()))
        if on_meta and worker_output.weights_path is not None:
            _assign(module, self._strategy.checkpoint_io.load_checkpoint(worker_output.weights_path))
            unsaved = torch.load(io.BytesIO(worker_output.extra["unsaved_buffers_bytes"]), weights_only=True)
            for name, tensor in unsaved.items():
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner).register_buffer(leaf, tensor, persistent=False)
        super()._recover_results_in_main_process(worker_output, trainer)


def _assign(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``module`` by assignment, keeping parameters shared under several names shared."""
    aliases = parameter_aliases(module)
    module.load_state_dict(state, strict=False, assign=True)
    retie(module, aliases)
