"""Train the tiny MLLM with a given strategy; rank 0 writes losses and final parameters to --out.

Run as a script (Lightning's popen launcher re-runs this file for every rank):

    python tests/strategy/run_tiny.py --strategy bigmac --devices 2 --pp 2 --steps 20 --out out.json
"""

from __future__ import annotations

import argparse
import json
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

import lightning_bigmac
from lightning_bigmac.testing.faults import strike_in_save
from lightning_bigmac.testing.tiny_module import TinyDataModule, TinyMLLMModule


@torch.no_grad()
def perturb_copies(module: TinyMLLMModule, rank: int, pp: int) -> None:
    """Change what this rank's copies hold, as another seed would; the source copies stay (global rank 0
    for the encoder and generator, data-parallel rank 0 for each stage)."""
    parts = module.pipeline_parts()
    changed = [parts.encoder, parts.generator] if rank > 0 else []
    if rank >= pp:
        changed = [module]
    gen = torch.Generator().manual_seed(100 + rank)
    for part in changed:
        for p in part.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="bigmac", help="bigmac, or a Lightning strategy name")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--vpp", type=int, default=1)
    p.add_argument("--schedule", default="bigmac")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--val-steps", type=int, default=0)
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--costs", default=None, help="BigMacStrategy(costs=...)")
    p.add_argument("--precision", default="32-true")
    p.add_argument(
        "--join", type=int, default=1, help="reference runs: data-parallel replicas joined per step"
    )
    p.add_argument("--layers", type=int, default=4, help="LLM blocks of the tiny model")
    p.add_argument("--ckpt-dir", default=None, help="save a sharded checkpoint at the end of every epoch")
    p.add_argument("--save-last", action="store_true", help="with --ckpt-dir: also overwrite last.ckpt")
    p.add_argument("--die-in-save", type=int, default=None, help="the last rank dies in its N-th save")
    p.add_argument("--async-save", action="store_true", help="Lightning's AsyncCheckpointIO plugin")
    p.add_argument("--resume", default=None, help="checkpoint to resume from")
    p.add_argument(
        "--perturb-replicas",
        action="store_true",
        help="build each rank's copies differently: encoder/generator on every rank but 0, everything "
        "on data-parallel replicas > 0 (setup must make them equal again)",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(0)
    module = TinyMLLMModule(layers=args.layers)
    if args.perturb_replicas:
        perturb_copies(module, rank=int(os.environ.get("LOCAL_RANK", 0)), pp=args.pp)
    strategy = args.strategy
    if strategy == "bigmac":
        strategy = lightning_bigmac.BigMacStrategy(
            pipeline_parallel_size=args.pp, virtual_chunks=args.vpp, schedule=args.schedule,
            microbatches=args.microbatches, costs=args.costs, timeout=120,
        )  # fmt: skip
    callbacks = []
    if args.ckpt_dir:
        callbacks.append(
            ModelCheckpoint(dirpath=args.ckpt_dir, every_n_epochs=1, save_top_k=-1, save_last=args.save_last)
        )
    if args.die_in_save is not None:
        strike_in_save(rank=args.devices - 1, save=args.die_in_save)
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=args.devices, max_epochs=args.epochs,
        gradient_clip_val=args.clip, precision=args.precision, logger=False,
        enable_checkpointing=bool(args.ckpt_dir), callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
        limit_val_batches=args.val_steps or 0, plugins=[AsyncCheckpointIO()] if args.async_save else None,
    )  # fmt: skip
    data = TinyDataModule(args.steps, args.microbatches, val_steps=args.val_steps, join_replicas=args.join)
    trainer.fit(module, data, ckpt_path=args.resume)
    planned = None
    if isinstance(trainer.strategy, lightning_bigmac.BigMacStrategy):
        full = trainer.strategy.full_state_dict()
        costs = trainer.strategy.costs
        planned = {"latency": None if costs is None else costs.latency}
    else:
        full = {k: v.detach() for k, v in module.state_dict().items()}
    if trainer.global_rank == 0:
        result = {
            "losses": module.losses,
            "planned": planned,
            "val_loss": float(trainer.callback_metrics["val_loss"]) if args.val_steps else None,
            "val_acc": float(trainer.callback_metrics["val_acc"]) if args.val_steps else None,
            "params": {k: v.flatten().tolist() for k, v in full.items()},
        }
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
