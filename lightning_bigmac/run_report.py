"""``RunReport``: a callback that turns a training run into a folder a person can read.

Add it to any ``Trainer`` (``strategy="bigmac"`` or not)::

    trainer = pl.Trainer(strategy="bigmac", callbacks=[RunReport("runs/mllm")], ...)

During training it shows samples/s in the progress bar next to the module's own logged loss. At
step ``profile_step`` (under ``BigMacStrategy``) it profiles one step and writes its
:class:`~lightning_bigmac.step_report.StepProfile` (Gantt chart, Chrome trace, cost file, memory
report) into ``dirpath/profile/``. When training ends it writes:

=========================  ==========================================================================
``checkpoints/final.ckpt``  the last state (a sharded directory under ``BigMacStrategy``); resumable
``consolidated.ckpt``       the last state as one ordinary Lightning checkpoint (``load_from_checkpoint``)
``loss_curve.png``          training loss per step and every validation metric over steps
``metrics.json``            the same numbers, plus wall time and samples/s
=========================  ==========================================================================
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .batches import Microbatches
from .checkpoint import consolidate
from .schedule.pictures import figure, save
from .strategy import BigMacStrategy

__all__ = ["RunReport", "count_samples"]


def count_samples(batch: Any) -> int:
    """Samples in a batch: ``len(mb["keys"])`` summed over a :class:`Microbatches` (packed
    microbatches name their samples), else the leading dimension of the first tensor."""
    parts = batch.microbatches if isinstance(batch, Microbatches) else [batch]
    total = 0
    for part in parts:
        if isinstance(part, dict) and "keys" in part:
            total += len(part["keys"])
        else:
            leaves = [t for t in torch.utils._pytree.tree_leaves(part) if isinstance(t, torch.Tensor)]
            total += len(leaves[0]) if leaves and leaves[0].dim() else 1
    return total


class RunReport(pl.Callback):
    """Progress (samples/s), a profiled step, a loss curve and a consolidated checkpoint in ``dirpath``.

    Args:
        dirpath: the run folder; None uses ``trainer.default_root_dir``.
        profile_step: the training step to profile under ``BigMacStrategy`` (after the first steps
            have warmed up); None profiles nothing.
        samples_fn: counts the samples of one replica's batch (default :func:`count_samples`);
            samples/s multiplies it by the number of data-parallel replicas.
        window: steps averaged for the samples/s shown in the progress bar.

    The records (losses, validation rows, samples) cover this process's run: a run resumed with
    ``ckpt_path`` starts a new ``metrics.json`` from the resumed step.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        profile_step: int | None = 5,
        samples_fn: Callable[[Any], int] = count_samples,
        window: int = 10,
    ) -> None:
        self.dirpath = dirpath
        self.profile_step = profile_step
        self.samples_fn = samples_fn
        self.recent: deque[tuple[int, float]] = deque(maxlen=window)
        self.train_loss: list[tuple[int, float]] = []
        self.val: list[dict[str, float]] = []
        self.samples = 0
        self.train_seconds = 0.0
        self._started = self._step_start = 0.0

    def folder(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir)

    @staticmethod
    def _replicas(trainer: pl.Trainer) -> int:
        strategy = trainer.strategy
        if isinstance(strategy, BigMacStrategy):
            return strategy.data_parallel_size
        return trainer.world_size

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, BigMacStrategy) and trainer.global_step == self.profile_step:
            strategy.profile_next_step()
        self._step_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        seconds = time.perf_counter() - self._step_start
        samples = self.samples_fn(batch) * self._replicas(trainer)
        self.samples += samples
        self.train_seconds += seconds
        self.recent.append((samples, seconds))
        rate = sum(n for n, _ in self.recent) / max(sum(s for _, s in self.recent), 1e-9)
        pl_module.log("samples_per_s", rate, prog_bar=True, batch_size=1)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.train_loss.append((trainer.global_step, float(loss)))
        self._write_profile(trainer)

    def _write_profile(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, BigMacStrategy) or strategy.last_profile is None:
            return
        profile, strategy.last_profile = strategy.last_profile, None
        files = profile.write(self.folder(trainer) / "profile")
        rank_zero_info(f"RunReport: profiled step {profile.step} -> {', '.join(str(f) for f in files)}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        self.val.append({"step": trainer.global_step, **row})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = self.folder(trainer)
        final = out / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(final)  # a collective: every rank writes its shard
        consolidated = out / "consolidated.ckpt"
        if isinstance(trainer.strategy, BigMacStrategy):
            if trainer.is_global_zero:
                consolidate(final, consolidated)
            trainer.strategy.barrier("RunReport.consolidate")
        else:
            trainer.save_checkpoint(consolidated, weights_only=True)
        if trainer.is_global_zero:
            self._write_curves(out, trainer)

    def metrics(self) -> dict[str, Any]:
        """Everything recorded, JSON-ready."""
        return {
            "seconds": round(time.perf_counter() - self._started, 1),
            "train_seconds": round(self.train_seconds, 1),
            "samples": self.samples,
            "samples_per_s": round(self.samples / max(self.train_seconds, 1e-9), 2),
            "train_loss": self.train_loss,
            "val": self.val,
        }

    def _write_curves(self, out: Path, trainer: pl.Trainer) -> None:
        (out / "metrics.json").write_text(json.dumps(self.metrics(), indent=1))
        draw_curves(self.train_loss, self.val, out / "loss_curve.png")
        rank_zero_info(f"RunReport: wrote {out / 'loss_curve.png'}, {out / 'metrics.json'}")


def draw_curves(train_loss: list[tuple[int, float]], val: list[dict[str, float]], path: Path) -> Path:
    """Training loss per step (left) and each validation metric over steps (right)."""
    fig = figure(figsize=(12, 4))
    left, right = fig.subplots(1, 2)
    if train_loss:
        steps, losses = zip(*train_loss, strict=True)
        left.plot(steps, losses, lw=0.8, alpha=0.5, label="train loss (step)")
        windows = [losses[max(0, i - 19) : i + 1] for i in range(len(losses))]
        left.plot(steps, [sum(w) / len(w) for w in windows], lw=1.6, label="train loss (20-step mean)")
    if val and "val_loss" in val[0]:
        left.plot([v["step"] for v in val], [v["val_loss"] for v in val], "o-", label="val loss")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend()
    left.grid(alpha=0.3)
    for key in sorted({k for v in val for k in v} - {"step", "val_loss"}):
        right.plot([v["step"] for v in val if key in v], [v[key] for v in val if key in v], "o-", label=key)
    right.set_xlabel("step")
    right.set_title("validation metrics")
    if right.lines:
        right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path, dpi=110)
