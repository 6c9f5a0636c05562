"""Train the example MLLM on its generated data; print the validation curve and throughput.

    python -m examples.mllm.train                                   # strategy="auto", one process
    python -m examples.mllm.train --reader hf --max-steps 100       # the HF datasets path
    python -m examples.mllm.train --strategy bigmac --devices 2     # 2 pipeline stages (P=2)

Run from the repository root (``examples`` is imported from there). The first run generates the
data into the cache (``DataConfig.root``), about 20 s.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_bigmac import BigMacStrategy

from .config import DataConfig, ModelConfig
from .data import ExampleDataModule
from .model import ExampleMLLM


class Curve(pl.Callback):
    """Records the validation metrics, training loss and LLM tokens of every step, with wall time."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.val: list[dict[str, float]] = []
        self.train: list[float] = []
        self.tokens = 0
        self.step_seconds = 0.0
        self._step_start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, out: Any, batch: Any, idx: int) -> None:
        self.step_seconds += time.perf_counter() - self._step_start  # compute only: loading is before
        self.train.append(float(trainer.callback_metrics["train_loss"]))
        self.tokens += sum(len(mb["tokens"]) for mb in batch.microbatches)

    def on_validation_end(self, trainer: pl.Trainer, module: Any) -> None:
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        row.update(step=trainer.global_step, seconds=round(time.perf_counter() - self.start, 1))
        self.val.append(row)
        if trainer.is_global_zero:
            print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="auto", help="auto, bigmac, or any Lightning strategy name")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--schedule", default="bigmac", help="with --strategy bigmac: the pipeline schedule")
    p.add_argument("--reader", default="webdataset", choices=["webdataset", "hf"])
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--val-every", type=int, default=50, help="validate every this many training steps")
    p.add_argument("--train-samples", type=int, default=DataConfig.train_samples, help="per source")
    p.add_argument("--root", default="", help="data cache directory (default: ~/.cache/...)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process; 0: default")
    p.add_argument("--out", default="", help="write the curve as JSON here")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(0)
    strategy: Any = args.strategy
    if strategy == "bigmac":
        strategy = BigMacStrategy(pipeline_parallel_size=args.devices, schedule=args.schedule)
    data = ExampleDataModule(DataConfig(root=args.root, reader=args.reader, train_samples=args.train_samples))
    data.prepare_data()  # generates the shards on first use (not timed)
    curve = Curve()
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=args.devices, max_steps=args.max_steps,
        val_check_interval=args.val_every, check_val_every_n_epoch=None, gradient_clip_val=1.0,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
        callbacks=[curve], enable_progress_bar=False, inference_mode=False,  # validate(), then fit(): below
    )  # fmt: skip
    model = ExampleMLLM(ModelConfig())
    # the untrained model's row (step 0); with inference_mode=True the metrics' states would be
    # inference tensors after validate() and fit()'s validation could not update them
    trainer.validate(model, data, verbose=False)
    trainer.fit(model, data)
    seconds = time.perf_counter() - curve.start
    summary = {
        "steps": trainer.global_step,
        "seconds": round(seconds, 1),
        "train_step_seconds": round(curve.step_seconds, 1),
        "tokens_per_s": round(curve.tokens / curve.step_seconds),
    }
    if trainer.is_global_zero:
        print(json.dumps(summary))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"val": curve.val, "train_loss": curve.train, **summary}, f)


if __name__ == "__main__":
    main()
