"""Multi-process runs of the contract's options: the stage context and tied embeddings.

:func:`context_steps` runs the rotary variant of the tiny MLLM (``TinyConfig(rotary=True)``,
whose blocks take their rotary tables from ``PipelineParts.context``) through the executor on
every rank of a ``pp x 1`` layout, for several V in one spawn, and counts how often each rank
built the context.

:func:`fit_tied` trains :class:`TiedMLLMModule` (LM head tied to the token embedding) with
Lightning under ``strategy="auto"`` in this process or ``"bigmac"`` on every rank of a
:mod:`.spawn` job (:func:`tied_fits` runs several layouts in one job: the ranks are the job's
processes, which Lightning then neither launches nor re-initialises).
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_bigmac.runtime import PipelineExecutor, PipelineGroups
from lightning_bigmac.strategy import BigMacStrategy

from .scenarios import build_case_plan, case_config, case_microbatches
from .tiny_mllm import TinyConfig, TinyMLLM
from .tiny_module import TinyDataModule, TinyMLLMModule

__all__ = ["TiedMLLMModule", "context_steps", "fit_tied", "tied_fits"]


def context_steps(rank: int, pp: int, vpps: list[int], cases: list[dict[str, Any]]) -> dict[int, list[dict]]:
    """Per V in ``vpps``, per case: ``loss``, this rank's ``grads`` by parameter name and ``calls``,
    how often this rank built the context during the step. Cases as in :mod:`.scenarios` (their
    ``model`` must make the rotary variant, the same in every case: one model per V serves them all)."""
    groups = PipelineGroups.create(pp, 1)
    out: dict[int, list[dict]] = {}
    for vpp in vpps:
        out[vpp] = []
        model = TinyMLLM(case_config(cases[0]), seed=0)
        assert model.context is not None
        ex = PipelineExecutor(model.parts(), groups, vpp=vpp, timeout=60.0)
        for case in cases:
            for p in ex.parameters():
                p.grad = None
            model.context.calls = 0
            res = ex.step(build_case_plan(case, pp, vpp), case_microbatches(case, 0))
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            out[vpp].append({"loss": res.loss, "grads": grads, "calls": model.context.calls})
    return out


class TiedMLLMModule(TinyMLLMModule):
    """:class:`~.tiny_module.TinyMLLMModule` with the LM head's weight tied to the token embedding."""

    def __init__(self, layers: int = 4, lr: float = 0.05, seed: int = 0):
        super().__init__(layers=layers, lr=lr, seed=seed)
        self.model = TinyMLLM(TinyConfig(layers=layers, tied=True), seed=seed)


class _GradNorms(pl.Callback):
    """Each step's gradient norm before clipping: the strategy's global one under ``bigmac``."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any
    ) -> None:
        if isinstance(trainer.strategy, BigMacStrategy):
            self.norms.append(trainer.strategy.global_grad_norm())
        else:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))


def fit_tied(
    *,
    devices: int = 1,
    pp: int = 0,
    vpp: int = 1,
    epochs: int = 1,
    steps: int = 4,
    clip: float | None = None,
    join: int = 1,
    save: str | None = None,
    resume: str | None = None,
    perturb_last: bool = False,
) -> dict[str, Any]:
    """Train :class:`TiedMLLMModule` for ``epochs`` of ``steps`` steps (AdamW, clipping at ``clip``);
    ``pp=0``: ``strategy="auto"``, else ``BigMacStrategy(pp, vpp)`` over ``devices`` ranks. ``join``:
    the one-process reference of ``join`` data-parallel replicas. Saves a checkpoint to ``save``,
    resumes from ``resume``. ``perturb_last``: the last pipeline rank's tied weight starts off
    another (setup must overwrite it with stage 0's). Returns the ``losses`` and gradient ``norms``
    of the steps trained and this rank's copy of the tied weight (None where it holds none)."""
    pl.seed_everything(0)
    module, norms = TiedMLLMModule(), _GradNorms()
    if perturb_last and int(os.environ.get("LOCAL_RANK", 0)) % pp == pp - 1:
        with torch.no_grad():
            weight = module.model.head.out.weight
            weight.add_(0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    strategy = BigMacStrategy(pipeline_parallel_size=pp, virtual_chunks=vpp, timeout=60) if pp else "auto"
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_epochs=epochs, gradient_clip_val=clip,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, limit_val_batches=0, callbacks=[norms],
    )  # fmt: skip
    trainer.fit(module, TinyDataModule(steps, microbatches=4, join_replicas=join), ckpt_path=resume)
    if save is not None:
        trainer.save_checkpoint(save)
    weight = module.model.embedding.tokens.weight
    return {
        "losses": module.losses,
        "norms": norms.norms,
        "tied": None if weight.is_meta else weight.detach().clone(),
        "one_tensor": module.model.head.out.weight is weight,
    }


def tied_fits(rank: int, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`fit_tied` of each of ``runs`` (its keyword arguments) on this rank of a spawn job."""
    os.environ["LOCAL_RANK"] = str(rank)  # the job made the processes: Lightning must not launch any
    return [fit_tied(devices=torch.distributed.get_world_size(), **run) for run in runs]
