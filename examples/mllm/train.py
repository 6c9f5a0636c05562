"""The main job: train the example MLLM from a LightningCLI config and fill a run folder.

    python -m examples.mllm.train --config examples/configs/mllm_cpu.yaml          # 2 processes, bigmac
    python -m examples.mllm.train --config examples/configs/mllm_cpu.yaml \\
        --trainer.strategy.init_args.schedule=megatron                            # another schedule
    python -m examples.mllm.train --config examples/configs/mllm_cpu.yaml \\
        --trainer.strategy=auto --trainer.devices=1                               # one process
    python -m examples.mllm.train --config examples/configs/mllm_cpu.yaml \\
        --trainer.max_steps=900 --ckpt_path=runs/mllm/checkpoints/final.ckpt     # resume, 300 more steps

Run from the repository root (``examples`` is imported from there). It is ``LightningCLI`` with one
addition: the untrained model is validated first (unless ``--ckpt_path`` resumes a run), so the
run's first validation row is step 0 and the summary can say how far validation loss fell. The run
folder (the trainer's ``default_root_dir``) then holds checkpoints, consolidated weights, the loss
curve, the profiled step's Gantt chart and the memory report; the last line printed is a JSON
summary.
"""

from __future__ import annotations

import json
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_bigmac import RunReport

from .data import ExampleDataModule
from .model import ExampleMLLM


class ExampleCLI(LightningCLI):
    """LightningCLI for the example; the data module reads the model's geometry (patch size, merge)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.config", "data.model")
        parser.add_argument(
            "--ckpt_path", default=None, help="resume from this checkpoint (e.g. checkpoints/final.ckpt)"
        )


def summary(report: RunReport) -> dict[str, Any]:
    """Headline figures of a finished run: validation loss drop, metric against chance, speed."""
    first, last = report.val[0], report.val[-1]
    drop = 1 - last["val_loss"] / first["val_loss"]
    return {
        "steps": last["step"],
        "seconds": report.metrics()["seconds"],
        "samples_per_s": report.metrics()["samples_per_s"],
        "val_loss_first": round(first["val_loss"], 3),
        "val_loss_last": round(last["val_loss"], 3),
        "val_loss_drop": round(drop, 3),
        "val_answer_acc": round(last.get("val_answer_acc", float("nan")), 3),
        "val_chance_acc": round(last.get("val_chance_acc", float("nan")), 3),
    }


def main() -> None:
    cli = ExampleCLI(ExampleMLLM, ExampleDataModule, run=False, save_config_kwargs={"overwrite": True})
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    resume = cli.config.get("ckpt_path")
    if resume is None:
        trainer.validate(model, data, verbose=False)  # step 0: the untrained model's row
    trainer.fit(model, data, ckpt_path=resume)
    report = next((c for c in trainer.callbacks if isinstance(c, RunReport)), None)
    if trainer.is_global_zero and report is not None and report.val:
        figures = summary(report)
        (report.folder(trainer) / "summary.json").write_text(json.dumps(figures, indent=1))
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
