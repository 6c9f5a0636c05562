"""``BigMacStrategy``: the Lightning lifecycle around the pipeline runtime, registered as ``"bigmac"``.

The constructor stores and checks the configuration (and builds a trial plan, so an unsafe knob
fails before any process starts); ``set_world_ranks`` checks the world size against the pipeline
size, also before launch; ``setup_environment`` creates the process groups; ``setup`` reads the
model contract, places the stages (a rank keeps only its parameters) and builds the optimizers
over those. Inside a step, :func:`~lightning_bigmac.contract.step_loss` calls :meth:`run_step`,
which replays the plan's forward and backward; Lightning's own zero-grad and backward are
switched off (``fit_loop._skip_backward``, as Lightning's SWA callback does), so the gradients
the runtime computed reach the optimizer untouched.

The strategy holds the Lightning lifecycle only and delegates: which plan a step runs to
:mod:`~lightning_bigmac.planning`, the step itself to :mod:`~lightning_bigmac.runtime`, profiled
steps to :mod:`~lightning_bigmac.step_report`, files to :mod:`~lightning_bigmac.checkpoint`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.distributed import (
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torchmetrics import Metric
from typing_extensions import override

from .batches import split_batch
from .checkpoint_hooks import CheckpointHooks
from .contract import PipelineStepRunner, check_contract
from .launcher import GatheringLauncher
from .planning import Planner
from .runtime import collectives
from .runtime.executor import PipelineExecutor, StepResult
from .runtime.grad_sync import clip_grad_norm_, global_grad_norm, norm_parameters
from .runtime.groups import PipelineGroups
from .runtime.parts import LossWeights
from .runtime.replicas import equalise_replicas
from .runtime.watch import DEFAULT_TIMEOUT, PeerWatch
from .sampler_check import warn_if_sampler_shuffles
from .schedule import OpCosts, Plan, ScheduleConfig
from .step_report import StepProfile, profiled_step
from .trainer_checks import check_layout_fits, check_trainer, check_world_size

__all__ = ["BigMacStrategy"]

_START_METHODS = ("popen", "spawn", "fork")


class BigMacStrategy(CheckpointHooks, ParallelStrategy, PipelineStepRunner):
    """Train a multimodal LLM with a pipeline schedule from :mod:`lightning_bigmac.schedule`.

    Args:
        pipeline_parallel_size: P, ranks per pipeline; the world is P x D with D data-parallel replicas.
        virtual_chunks: V, LLM chunks per rank (interleaving); needs at least P x V LLM blocks.
        schedule: a builder name: ``bigmac`` (default), ``bigmac_zb``, ``megatron``, ``ideal``,
            ``interleaved``, ``1f1b`` or ``gpipe``.
        microbatches: M per step for batches that are pytrees of tensors (split along dim 0);
            None means 4 x P (as ``bigmac plan``; the fill/drain bubble is about (P-1)/M of a step).
            Batches with a ``microbatches`` list (the balancer's) bring their own.
        encoder_warmup: bigmac's W; None picks the smallest safe W within 2% of the ideal step.
        llm_warmup: bigmac's LLM warm-up extension: ``"auto"``, ``"minimal"``, ``"group"`` or ints.
        held_columns / weight_deferral: ``bigmac_zb``'s caps on encoder/generator columns held at once
            and on deferred LLM weight-gradient ops; None picks the smallest safe values.
        costs: what plans are built with (:class:`~lightning_bigmac.planning.Planner`): None (unit
            costs: the plan is known before the first step), the path of a cost file or runtime
            profile, or ``"profile"`` (the first training step's measured costs and latency, with
            which ``llm_warmup="auto"`` may keep one more microbatch in flight on the first stages).
        text_loss_weight / generator_loss_weight: weights of the two loss terms; None takes the
            module's ``loss_weights`` attribute (a :class:`LossWeights`) or 1.0.
        split_points: explicit LLM block index where each stage after the first starts.
        timeout: seconds any rank waits for a peer before failing with the peer and op named.
        process_group_backend: None picks gloo on CPU and NCCL on GPU.
        start_method: ``"popen"`` re-runs the script per rank (scripts, torchrun, SLURM);
            ``"spawn"``/``"fork"`` run inside this process tree (notebooks: ``"bigmac_notebook"``).
    """

    strategy_name = "bigmac"
    is_distributed = True  # Lightning reads this for sampler injection and sync_dist

    def __init__(
        self,
        pipeline_parallel_size: int = 2,
        virtual_chunks: int = 1,
        schedule: str = "bigmac",
        microbatches: int | None = None,
        encoder_warmup: int | None = None,
        llm_warmup: str | int | list[int] = "auto",
        held_columns: int | None = None,
        weight_deferral: int | None = None,
        costs: str | None = None,
        text_loss_weight: float | None = None,
        generator_loss_weight: float | None = None,
        split_points: list[int] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        process_group_backend: str | None = None,
        start_method: str = "popen",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, checkpoint_io=checkpoint_io,
            cluster_environment=cluster_environment, precision_plugin=precision_plugin,
        )  # fmt: skip
        if start_method not in _START_METHODS:
            raise ValueError(f"start_method={start_method!r}: choose one of {', '.join(_START_METHODS)}")
        if timeout <= 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds")
        self.schedule = ScheduleConfig(
            schedule=schedule,
            pp=pipeline_parallel_size,
            vpp=virtual_chunks,
            microbatches=4 * pipeline_parallel_size if microbatches is None else microbatches,
            encoder_warmup=encoder_warmup,
            llm_warmup=llm_warmup,
            held_columns=held_columns,
            weight_deferral=weight_deferral,
        )
        self.planner = Planner(self.schedule, costs)  # an unsafe knob fails here, before launch
        self.loss_weights_override = (text_loss_weight, generator_loss_weight)
        self.split_points = split_points
        self.timeout = timeout
        self._process_group_backend = process_group_backend
        self._start_method = start_method
        self.num_nodes = 1
        self.groups: PipelineGroups | None = None
        self.executor: PipelineExecutor | None = None
        self.last_result: StepResult | None = None
        self.last_profile: StepProfile | None = None
        """The step :meth:`profile_next_step` asked for, on global rank 0 (None elsewhere)."""
        self._profile_next = False
        self._ran_step = False

    @property
    def costs(self) -> OpCosts | None:
        """The costs plans are built with now (None: unit costs); see the ``costs`` argument."""
        return self.planner.costs

    # ---- layout ---------------------------------------------------------------------------------
    @property
    def pipeline_parallel_size(self) -> int:
        return self.schedule.pp

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.schedule.pp

    @property
    def data_parallel_rank(self) -> int:
        return self.global_rank // self.schedule.pp  # pipelines are contiguous (runtime/groups.py)

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:  # a replica's pipeline ranks see the same data
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    process_dataloader = warn_if_sampler_shuffles  # Lightning's injected sampler shuffles: docs/strategy.md

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # shards load into the placed stages and the optimizers built over them

    # ---- launch and processes -------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )
        else:
            self._launcher = GatheringLauncher(self, start_method=self._start_method)

    def set_world_ranks(self) -> None:
        """Called by the Trainer before any process is launched: the world-size check belongs here."""
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank
        check_world_size(self.schedule.pp, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            self.root_device
        )
        self._process_group_backend = backend
        _init_dist_connection(self.cluster_environment, backend, timeout=timedelta(seconds=self.timeout))
        self.groups = PipelineGroups.create(self.schedule.pp, timeout=self.timeout)
        rank_zero_info(f"BigMacStrategy: {self.groups.describe()}")

    # ---- setup ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None and self.groups is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        check_trainer(trainer, module)
        parts = check_contract(module)
        check_layout_fits(parts, self.schedule)
        self.precision_plugin.convert_module(self.model)
        self.executor = PipelineExecutor(
            parts,
            self.groups,
            vpp=self.schedule.vpp,
            split_points=self.split_points,
            weights=(getattr(module, "loss_weights", None) or LossWeights()).replace_some(
                *self.loss_weights_override
            ),
            device=self.root_device,
            timeout=self.timeout,
        )
        equalise_replicas(self.executor)  # as DDP does at setup
        self.planner.use_parts(parts)
        self.model_to_device()
        for metric in self.model.modules():
            if isinstance(metric, Metric):  # every pipeline rank saw the same outputs: reduce over replicas
                metric.process_group = self.groups.dp_group
        rank_zero_info(f"BigMacStrategy: {self.executor.partition.describe()}")
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self.executor.restrict_optimizers(self.optimizers)
            trainer.fit_loop._skip_backward = True  # the runtime did the backward; see the module docstring
        self.setup_precision_plugin()
        # Lightning clips by a per-rank norm; the global norm spans every stage of the pipeline.
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_global_norm
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        plan = self.plan_for(self.schedule.microbatches)
        rank_zero_info(f"BigMacStrategy: {plan.schedule} plan, knobs {dict(plan.knobs)}")

    def _move_held(self, device: torch.device) -> None:
        """Move what the module holds to ``device``, leaving the freed (meta) pipeline parts alone."""
        assert self.model is not None
        self.model._apply(lambda t: t if t.is_meta else t.to(device))

    @override
    def model_to_device(self) -> None:
        self._move_held(self.root_device)  # the executor placed the stages; this moves metrics, buffers

    @override
    def teardown(self) -> None:
        # Strategy.teardown without `lightning_module.cpu()`, which cannot copy the freed parts.
        assert self.cluster_environment is not None
        self.cluster_environment.teardown()
        _optimizers_to_device(self.optimizers, torch.device("cpu"))
        if self.model is not None:
            self._move_held(torch.device("cpu"))
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()

    # ---- one step -------------------------------------------------------------------------------
    def plan_for(
        self, microbatches: int, owners: list[int] | None = None, forward_only: bool = False
    ) -> Plan:
        """The (cached) plan of a step with ``microbatches`` microbatches and this owner map."""
        return self.planner.plan_for(microbatches, owners, forward_only)

    @override
    def run_step(self, batch: Any) -> torch.Tensor:
        """Run one step of ``batch`` through the pipeline; return its global loss (no graph).

        Training: forward and backward with the gradients left in ``.grad`` (summed over the
        data-parallel replicas). Evaluation (the module in eval mode): a forward-only plan.
        """
        assert self.executor is not None
        training = self.lightning_module.training
        microbatches, owners = split_batch(batch, self.schedule.microbatches)
        plan = self.plan_for(len(microbatches), owners, forward_only=not training)
        if training:
            for p in self.executor.parameters():
                p.grad = None
        if training and (self._profile_next or self.planner.wants_profile):
            step = self.lightning_module.trainer.global_step
            self.last_result, profile = profiled_step(self.executor, plan, microbatches, step)
            if self._profile_next:
                self._profile_next, self.last_profile = False, profile
            if self.planner.wants_profile:
                change = self.planner.adopt_profile(profile, self.broadcast, len(microbatches))
                rank_zero_info(f"BigMacStrategy: {change}")
        else:
            self.last_result = self.executor.step(plan, microbatches)
        self._ran_step = True
        return torch.tensor(self.last_result.loss, device=self.root_device)

    @override
    def last_eval_outputs(self) -> list[Any]:
        return (self.last_result.eval_outputs if self.last_result is not None else None) or []

    def profile_next_step(self) -> None:
        """Time every op and count saved activations during the next training step (a one-off).

        Afterwards :attr:`last_profile` holds a :class:`~lightning_bigmac.step_report.StepProfile`
        on global rank 0: replica 0's per-op events and per-rank activation peaks. Every rank must
        call this before the same step (a callback's ``on_train_batch_start`` does).
        """
        self._profile_next = True

    def _call_step(self, hook: str, *args: Any, **kwargs: Any) -> Any:
        self._ran_step = False
        out = getattr(super(), hook)(*args, **kwargs)
        if not self._ran_step:
            raise MisconfigurationException(
                f"{type(self.lightning_module).__name__}.{hook} did not call "
                "lightning_bigmac.step_loss(self, "
                "batch): under BigMacStrategy the pipeline computes the loss (see lightning_bigmac.contract)"
            )
        return out

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._call_step("training_step", *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._call_step("validation_step", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._call_step("test_step", *args, **kwargs)

    # ---- gradients ------------------------------------------------------------------------------
    def global_grad_norm(self) -> float:
        """The 2-norm of the whole model's gradient, as one process would compute it (a collective)."""
        ex = self.executor
        assert ex is not None
        llm = norm_parameters(ex.llm_parameters(), ex.parts, ex.groups)  # a tied parameter once
        return global_grad_norm(llm, ex.replica_parameters(), ex.groups.pipeline_group, ex.device, ex.watch)

    def _clip_grad_by_global_norm(self, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        assert self.executor is not None
        clip_grad_norm_(self.executor.parameters(), self.global_grad_norm(), float(clip_val))

    # ---- collectives: bounded by the timeout, a lost peer raises PeerError (runtime/collectives.py)
    def _watch(self) -> PeerWatch:  # the executor's names the step; before setup there is none
        beacon = self.groups.beacon if self.groups else None
        return self.executor.watch if self.executor else PeerWatch(dist.get_rank(), self.timeout, beacon)

    @override
    def barrier(self, name: str | None = None) -> None:
        if dist.is_available() and dist.is_initialized():
            collectives.barrier(None, self._watch(), f"the barrier {name!r}" if name else "a barrier")

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return obj
        return collectives.broadcast_object(obj, src, None, self._watch(), "a broadcast", self.root_device)

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean") -> Any:
        ok = isinstance(tensor, torch.Tensor) and dist.is_available() and dist.is_initialized()
        return collectives.all_reduce(tensor, group, self._watch(), "a reduce", reduce_op) if ok else tensor

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        entries = (("bigmac", "popen"), ("bigmac_spawn", "spawn"), ("bigmac_fork", "fork"))
        for name, start_method in (*entries, ("bigmac_notebook", "fork")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name, cls, description=f"BigMac nested pipeline, start_method={start_method!r}",
                    start_method=start_method,
                )  # fmt: skip


BigMacStrategy.register_strategies(StrategyRegistry)
