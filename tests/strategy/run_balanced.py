"""Train the tiny MLLM on balancer steps under strategy="bigmac", stop, resume from the strategy's
checkpoint: two fits in one launch. Rank 0 writes the steps each fit trained to --out.

    python tests/strategy/run_balanced.py --ckpt DIR --stop 3 --steps 8 --out keys.json

Lightning's launcher re-runs this file for every rank; the second fit finds the processes and the
process group of the first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from balanced_steps import Keys, Steps, rows

from lightning_bigmac import BigMacStrategy
from lightning_bigmac.data_state import DataPosition
from lightning_bigmac.testing.tiny_module import TinyMLLMModule


def fit(max_steps: int, ckpt: Path, resume: bool) -> tuple[pl.Trainer, list]:
    keys = Keys()
    trainer = pl.Trainer(
        strategy=BigMacStrategy(pipeline_parallel_size=2, timeout=120), accelerator="cpu", devices=2,
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[DataPosition(), keys],
    )  # fmt: skip
    trainer.fit(TinyMLLMModule(), Steps(rows), ckpt_path=ckpt if resume else None)
    return trainer, keys.seen


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--stop", type=int, required=True, help="steps of the first fit")
    p.add_argument("--steps", type=int, required=True, help="steps of the whole run")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    first, seen = fit(args.stop, args.ckpt, resume=False)
    first.save_checkpoint(args.ckpt)  # as RunReport writes checkpoints/final.ckpt
    second, rest = fit(args.steps, args.ckpt, resume=True)
    if second.global_rank == 0:
        args.out.write_text(json.dumps({"first": seen, "rest": rest}))


if __name__ == "__main__":
    main()
