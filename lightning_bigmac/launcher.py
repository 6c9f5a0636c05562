"""The spawn/fork launcher for notebooks: hands the whole trained model back, not rank 0's stages.

Lightning's multiprocessing launcher returns rank 0's state dict to the main process. Under a
pipeline, rank 0 holds only its own stages (the rest were freed), so before that hand-over the
launcher gathers every stage's parameters onto rank 0 (a collective over the first pipeline).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

__all__ = ["GatheringLauncher"]


class GatheringLauncher(_MultiProcessingLauncher):
    @override
    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> Any:
        if trainer.state.fn == TrainerFn.FITTING:
            full = self._strategy.full_state_dict()
            if full is not None:  # rank 0: materialise the stages it had freed
                trainer.lightning_module.load_state_dict(full, strict=False, assign=True)
        return super()._collect_rank_zero_results(trainer, results)
