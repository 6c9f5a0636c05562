"""Train the tiny MLLM through phases that freeze different parts; rank 0 writes losses and, under
``bigmac``, each phase's profiled plan and measured activation peaks to --out.

Run as a script (Lightning's popen launcher re-runs this file for every rank):

    python tests/strategy/run_frozen.py --strategy bigmac --schedule bigmac --devices 2 --out out.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import lightning.pytorch as pl
import torch

import lightning_bigmac
from lightning_bigmac.testing.tiny_module import TinyDataModule, TinyMLLMModule

PHASES = ((), ("encoder",), ("llm", "encoder.blocks"), ("generator",), ("encoder", "llm"))
"""What is frozen in each phase: nothing, the encoder (a frozen ViT), the LLM and the encoder's
blocks (a frozen ViT and LLM, with the encoder's patch projection training: the LLM's backwards
still carry its gradients), the generator, and everything but the generator."""
STEPS_PER_PHASE = 2


class PhasedFreezing(TinyMLLMModule):
    """Freezes ``PHASES[i]`` during phase ``i`` (before each step, so the step's plan reads it) and,
    under ``bigmac``, profiles the first step of each phase."""

    def __init__(self) -> None:
        super().__init__()
        self.profiles: list[dict[str, Any]] = []

    def _phase(self, batch_idx: int) -> tuple[str, ...]:
        return PHASES[batch_idx // STEPS_PER_PHASE]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        parts = self.pipeline_parts()
        self.model.requires_grad_(True)
        named = {"encoder": [parts.encoder], "encoder.blocks": [parts.encoder.blocks]}
        named |= {"llm": [parts.embedding, *parts.blocks, parts.head], "generator": [parts.generator]}
        for name in self._phase(batch_idx):
            for module in named[name]:
                module.requires_grad_(False)
        strategy = self.trainer.strategy
        if batch_idx % STEPS_PER_PHASE == 0 and isinstance(strategy, lightning_bigmac.BigMacStrategy):
            strategy.profile_next_step()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        strategy = self.trainer.strategy
        profile = getattr(strategy, "last_profile", None)
        if batch_idx % STEPS_PER_PHASE == 0 and profile is not None:  # global rank 0 of a bigmac run
            kinds = sorted({op.kind for ops in profile.plan.ranks for op in ops})
            self.profiles.append(
                {"frozen": sorted(profile.plan.frozen), "kinds": kinds, "peaks": profile.activation_peak}
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="bigmac", help="bigmac, or a Lightning strategy name")
    p.add_argument("--schedule", default="bigmac")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(0)
    module = PhasedFreezing()
    strategy = args.strategy
    if strategy == "bigmac":
        strategy = lightning_bigmac.BigMacStrategy(
            pipeline_parallel_size=args.devices, schedule=args.schedule, microbatches=4, timeout=120
        )
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=args.devices, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, TinyDataModule(len(PHASES) * STEPS_PER_PHASE, microbatches=4))
    if trainer.global_rank == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": module.losses, "profiles": module.profiles}, f)


if __name__ == "__main__":
    main()
