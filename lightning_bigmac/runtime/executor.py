"""Replay one rank's op list of any plan: forward, backward, transfers, loss scaling, gradient sync.

One execution path serves every schedule: the executor walks ``plan.ranks[rank]`` in order and,
for each op, receives its input messages, computes, and posts its output messages, all derived
from the plan's :class:`~lightning_bigmac.schedule.DataFlow` by
:class:`~lightning_bigmac.runtime.routes.Routes`. What each op does:

======  ==========================================================================================
EF.j    ``enc = encoder(mb_j)``; keep it for EB.j; send it (detached) to stage 0's F.j
F<c>.j  receive the previous stage's output (stage 0: ``enc``, or None) as fresh leaves; run the
        stage; the last stage also runs the head and scales the text loss; keep inputs and outputs
        for B; send the output to the next stage or to the generator owner's G.j
G.j     receive the last stage's output; generator forward, scaled loss, backward at once; send
        the gradient w.r.t. its input back to the last stage's B.j (forward-only: the loss only)
B<c>.j  receive the output gradient (or none: last stage without generator); backward from the
        kept outputs (and the scaled text loss); free them; send the input gradients upstream,
        from stage 0 to the encoder owner's EB.j
EB.j    receive the gradient of ``enc`` and backward through the kept encoder graph; free it
I<c>.j  split backward (:mod:`.backward`): like B, but only the input gradients; keep the graph
        and what the weight half needs
W<c>.j  the weight gradients of I<c>.j's graph; free it
GI.j    like G, but only the gradient w.r.t. its input; keep the graph for GW.j
GW.j    the generator's weight gradients of GI.j's graph; free it
======  ==========================================================================================

Failures: every wait on a peer is bounded by the timeout and a lost peer raises
:class:`~lightning_bigmac.runtime.errors.PeerError` naming the rank, the op and the step
(:mod:`.watch`); an exception from the user's modules inside an op is re-raised as
:class:`~lightning_bigmac.runtime.errors.OpError` naming the op and what its microbatch holds, and
its peers then fail with a PeerError that names this rank's error.

Loss scaling: a microbatch's text loss sum is multiplied by ``text_weight / T`` and its generator
loss sum by ``generator_weight / G`` where ``T`` and ``G`` count the targets of the whole step
over all data-parallel replicas (one all-reduce of two numbers per step), so that after the
bucketed gradient sum the gradients equal one big batch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from lightning_bigmac.schedule import Op, Plan
from lightning_bigmac.schedule.plan import EF, GW, F, W

from .backward import Kept, backward_input, backward_weight, full_backward, leaf_grads
from .collectives import all_reduce, broadcast_object
from .errors import describe_microbatch
from .grad_sync import DEFAULT_BUCKET_BYTES, all_reduce_grads, all_reduce_tied_grads
from .groups import PipelineGroups
from .memory import ActivationMeter
from .partition import Partition, Stage, partition, place
from .parts import LossWeights, PipelineParts
from .plan_fit import check_plan
from .profiler import OpProfiler
from .routes import Message, Routes
from .transfer import Transport
from .watch import DEFAULT_TIMEOUT

__all__ = ["PipelineExecutor", "StepResult"]


@dataclass(frozen=True)
class StepResult:
    """What one step produced on this rank (losses are global: the same on every rank)."""

    loss: float
    """``text_weight * text loss + generator_weight * generator loss`` of the whole step."""
    text_loss: float
    """Mean text loss over all text targets of the step (all replicas), unweighted."""
    generator_loss: float
    """Mean generator loss over all generator targets of the step, unweighted."""
    text_targets: int
    generator_targets: int
    activation_peak: dict[str, int] = field(default_factory=dict)
    """Peak bytes saved for backward per module on this rank (empty unless measuring)."""
    eval_outputs: list[Any] | None = None
    """Evaluation steps with ``PipelineParts.eval_outputs``: its result per microbatch, on every rank."""


def _leaves(tree: Any) -> list[Any]:
    return pytree.tree_leaves(tree)


def _detached(tree: Any) -> Any:
    """A copy of ``tree`` that starts a new graph, as if it had crossed the wire."""

    def cut(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().requires_grad_(x.requires_grad)
        return x

    return pytree.tree_map(cut, tree)


def _to(tree: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


class PipelineExecutor:
    """Runs steps of any plan on this rank of a ``pp x dp`` layout.

    Construction is collective over the world (it connects every transfer channel): build the
    :class:`PipelineGroups` first, then one executor per rank with the same arguments.

    ``vpp``/``split_points`` choose the partition (see
    :func:`~lightning_bigmac.runtime.partition.partition`); after construction the rank holds
    only its stages' parameters (plus encoder and generator replicas). ``timeout`` (seconds)
    bounds every wait for a peer. ``measure_memory``/``profile`` switch on activation accounting
    and per-op timing (both cheap, off by default). ``match_by_order``: see :class:`Transport`.
    """

    def __init__(
        self,
        parts: PipelineParts,
        groups: PipelineGroups,
        *,
        vpp: int = 1,
        split_points: Sequence[int] | None = None,
        weights: LossWeights | None = None,
        device: torch.device | str = "cpu",
        timeout: float = DEFAULT_TIMEOUT,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        measure_memory: bool = False,
        profile: bool = False,
        match_by_order: bool = False,
    ):
        self.parts, self.groups = parts, groups
        self.weights = weights or LossWeights()
        self.device = torch.device(device)
        self.bucket_bytes = bucket_bytes
        self.rank = groups.pipeline_rank
        self.partition: Partition = partition(parts, groups.pp, vpp, split_points=split_points)
        self.stages: list[Stage] = place(parts, self.partition, self.rank, self.device)
        self.transport = Transport(groups, device=self.device, timeout=timeout, match_by_order=match_by_order)
        self.watch = self.transport.watch
        """Bounds every wait on a peer and names the step in errors; shared with the transport."""
        self.transport.connect()
        self.memory = ActivationMeter(self.parameters()) if measure_memory else None
        self.profiler = OpProfiler(self.rank, self.device, self.watch) if profile else None
        self._routes: dict[int, Routes] = {}

    # ---- parameters -------------------------------------------------------------------------
    def llm_parameters(self) -> list[torch.nn.Parameter]:
        """This rank's LLM parameters (its stages, in stage order; a tied one once)."""
        return list({id(p): p for stage in self.stages for p in stage.parameters()}.values())

    def replica_parameters(self) -> list[torch.nn.Parameter]:
        """Encoder and generator parameters (replicated on every rank)."""
        mods = [m for m in (self.parts.encoder, self.parts.generator) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter this rank holds and updates: give these to the optimizer."""
        return self.llm_parameters() + self.replica_parameters()

    # ---- one step ---------------------------------------------------------------------------
    def _check(self, plan: Plan, microbatches: Sequence[Any]) -> None:
        check_plan(plan, len(microbatches), self.parts, self.stages, (self.groups.pp, self.partition.vpp))

    def routes(self, plan: Plan) -> Routes:
        """Messages of ``plan`` (cached per plan object; plans are immutable)."""
        key = id(plan)
        if key not in self._routes or self._routes[key].plan is not plan:
            self._routes = {key: Routes(plan)}
        return self._routes[key]

    def _targets(self, plan: Plan, microbatches: Sequence[Any]) -> tuple[int, int]:
        """Text and generator targets of the step over all replicas (a sum over the data-parallel group)."""
        text = sum(int(self.parts.text_targets(mb)) for mb in microbatches)
        gen = sum(int(self.parts.generator_targets(mb)) for mb in microbatches) if plan.generator else 0
        counts = torch.tensor([text, gen], dtype=torch.float64, device=self.device)
        if self.groups.dp > 1:
            all_reduce(counts, self.groups.dp_group, self.watch, "the target count all-reduce")
        return int(counts[0].item()), int(counts[1].item())

    def step(self, plan: Plan, microbatches: Sequence[Any]) -> StepResult:
        """Run one optimizer step's forward and backward of ``plan``; gradients accumulate in ``.grad``
        and are summed over the replicas before it returns.

        Every rank of every pipeline calls it with the same plan (and its replica's microbatches).
        A ``forward_only`` plan (evaluation) runs without autograd, keeps nothing and only reports
        the losses.
        """
        self._check(plan, microbatches)
        self.watch.step = 0 if self.watch.step is None else self.watch.step + 1
        try:
            run = _Step(self, plan, self.routes(plan), [_to(mb, self.device) for mb in microbatches])
            if self.memory is not None:
                self.memory.reset()
            if self.profiler is not None:
                self.profiler.start_step(self.groups.pipeline_group)
            with torch.set_grad_enabled(not plan.forward_only):
                run.execute()
            if not plan.forward_only:
                self.sync_gradients(plan)
            return run.result()
        except BaseException:
            self.transport.abandon()  # this rank is out: its peers must learn now, not at their timeout
            raise

    def restrict_optimizers(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Keep in each optimizer only the parameters this rank holds (``configure_optimizers`` saw all)."""
        own = {id(p) for p in self.parameters()}
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) in own]

    def sync_gradients(self, plan: Plan | None = None) -> int:
        """Sum gradients over the right groups; returns the number of all-reduce calls.

        Encoder/generator gradients are skipped when ``plan`` has no such work (a text-only step),
        which every rank knows from the plan. Tied embedding gradients: see :mod:`.grad_sync`.
        """
        groups, watch = self.groups, self.watch
        calls = all_reduce_grads(self.llm_parameters(), groups.dp_group, watch, self.bucket_bytes)
        calls += all_reduce_tied_grads(self.parts, groups, watch, self.bucket_bytes)
        for module in ("encoder", "generator"):
            part = getattr(self.parts, module)
            if part is not None and (plan is None or getattr(plan, module)):
                params, what = list(part.parameters()), f"the {module} gradient all-reduce"
                calls += all_reduce_grads(params, groups.replica_group, watch, self.bucket_bytes, what)
        return calls


class _Step:
    """State of one step on one rank: kept activations, the local mailbox, received-early messages."""

    def __init__(self, ex: PipelineExecutor, plan: Plan, routes: Routes, microbatches: list[Any]):
        self.ex, self.plan, self.routes, self.mbs = ex, plan, routes, microbatches
        self.rank = ex.rank
        self.stages = {stage.index: stage for stage in ex.stages}
        self.last = plan.pp * plan.vpp - 1
        self.kept: dict[tuple[str, int, int], Any] = {}
        self.mailbox: dict[Op, Any] = {}
        self.text_targets, self.gen_targets = ex._targets(plan, microbatches)
        self.text_sum = torch.zeros((), dtype=torch.float64, device=ex.device)
        self.gen_sum = torch.zeros((), dtype=torch.float64, device=ex.device)
        self.eval_outputs: dict[int, Any] = {}

    # ---- messages -----------------------------------------------------------------------------
    def receive(self, msg: Message) -> Any:
        """The payload of ``msg``: from the mailbox, or off the wire (in the sender's order)."""
        if msg.src == self.rank:
            return self.mailbox.pop(msg.consumer)
        return self.ex.transport.recv(msg.src, msg.tag, what=str(msg.consumer))

    def _answers(self, msg: Message) -> int | None:
        """Tag of the message ``msg`` answers with gradients (:meth:`Routes.request`): the transport
        then posts its receives as soon as that one is sent."""
        request = self.routes.request(msg)
        return None if request is None else request.tag

    def deliver(self, op: Op, payload: Any) -> None:
        for msg in self.routes.outputs(self.rank, op):
            if msg.dst == self.rank:
                self.mailbox[msg.consumer] = _detached(payload)
            else:
                what, answers = str(msg.consumer), self._answers(msg)
                self.ex.transport.send(payload, msg.dst, msg.tag, what=what, answers=answers)

    # ---- ops ------------------------------------------------------------------------------------
    def execute(self) -> None:
        ex, kinds = self.ex, self.plan.kinds
        for src in range(self.plan.pp):
            if src != self.rank:
                incoming = self.routes.from_peer(src, self.rank)
                ex.transport.expect(src, [(m.tag, str(m.consumer), self._answers(m)) for m in incoming])
        for op in self.plan.ranks[self.rank]:
            inputs = [self.receive(m) for m in self.routes.inputs(self.rank, op)]
            assert len(inputs) <= 1, f"{op} has {len(inputs)} input messages"
            x = inputs[0] if inputs else None
            prof = ex.profiler.op(op) if ex.profiler is not None else nullcontext()
            mem = ex.memory.record(op, kinds) if ex.memory is not None else nullcontext()
            with prof, mem, torch.set_grad_enabled(op.kind in kinds.records):  # off: nothing reads the graph
                try:
                    out = getattr(self, f"_{op.kind}")(op, x)
                except Exception as err:
                    held = describe_microbatch(self.mbs[op.microbatch])
                    raise ex.watch.op_failed(f"{op} (microbatch {op.microbatch}: {held})", err) from err
            self.deliver(op, out)
            ex.transport.poll()
        ex.transport.flush()
        assert not self.kept and not self.mailbox and ex.transport.idle(), "step ended with undelivered state"

    def _EF(self, op: Op, _: None) -> Any:
        enc = self.ex.parts.encoder(self.mbs[op.microbatch])
        if EF in self.plan.kinds.opens:  # a frozen encoder (or an evaluation step) keeps nothing
            self.kept[(EF, op.microbatch, -1)] = enc
        return enc

    def _EB(self, op: Op, grads: list[torch.Tensor | None]) -> None:
        enc = self.kept.pop((EF, op.microbatch, -1))
        full_backward(_leaves(enc), grads)

    def _F(self, op: Op, x: Any) -> Any:
        mb = self.mbs[op.microbatch]
        stage = self.stages[op.chunk * self.plan.pp + self.rank]
        h = stage(x, mb)
        loss = None
        if stage.index == self.last:
            text = stage.head(h, mb)
            self.text_sum += text.detach().double()
            loss = text * (self.ex.weights.text / self.text_targets) if self.text_targets else text * 0.0
            if self.plan.forward_only and self.ex.parts.eval_outputs is not None:
                self.eval_outputs[op.microbatch] = self.ex.parts.eval_outputs(h, mb)
        if F in self.plan.kinds.opens:
            self.kept[(F, op.microbatch, op.chunk)] = Kept(_leaves(x), _leaves(h), loss)
        return h

    def _B(self, op: Op, grads: list[torch.Tensor | None] | None) -> list[torch.Tensor | None]:
        kept: Kept = self.kept.pop((F, op.microbatch, op.chunk))
        full_backward(*kept.roots(grads))
        return leaf_grads(kept.inputs)

    def _I(self, op: Op, grads: list[torch.Tensor | None] | None) -> list[torch.Tensor | None]:
        kept: Kept = self.kept.pop((F, op.microbatch, op.chunk))
        input_grads, weights = backward_input(*kept.roots(grads), kept.inputs)
        if W in self.plan.kinds.run:  # a frozen LLM has no weight half
            self.kept[(W, op.microbatch, op.chunk)] = weights
        return input_grads

    def _W(self, op: Op, _: None) -> None:
        backward_weight(self.kept.pop((W, op.microbatch, op.chunk)))

    def _generator_loss(self, op: Op, h: Any) -> torch.Tensor | None:
        """The generator's scaled loss of ``op``'s microbatch; None where no backward reads it (an
        evaluation step, or a frozen generator with nothing upstream training)."""
        gen = self.ex.parts.generator(h, self.mbs[op.microbatch])
        self.gen_sum += gen.detach().double()
        if op.kind not in self.plan.kinds.opens:
            return None
        return gen * (self.ex.weights.generator / self.gen_targets if self.gen_targets else 0.0)

    def _G(self, op: Op, h: Any) -> list[torch.Tensor | None] | None:
        loss = self._generator_loss(op, h)
        if loss is None:
            return None
        loss.backward()
        return leaf_grads(_leaves(h))

    def _GI(self, op: Op, h: Any) -> list[torch.Tensor | None] | None:
        loss = self._generator_loss(op, h)
        if loss is None:
            return None
        grads, weights = backward_input([loss], [torch.ones_like(loss)], _leaves(h))
        if GW in self.plan.kinds.run:  # a frozen generator has no weight half
            self.kept[(GW, op.microbatch, -1)] = weights
        return grads

    def _GW(self, op: Op, _: None) -> None:
        backward_weight(self.kept.pop((GW, op.microbatch, -1)))

    # ---- result ---------------------------------------------------------------------------------
    def result(self) -> StepResult:
        """Global losses: every rank adds what it computed, summed over the world."""
        sums = torch.stack([self.text_sum, self.gen_sum])
        all_reduce(sums, self.ex.groups.replica_group, self.ex.watch, "the loss all-reduce")
        text_sum, gen_sum = sums.tolist()
        text = text_sum / self.text_targets if self.text_targets else 0.0
        gen = gen_sum / self.gen_targets if self.gen_targets else 0.0
        w = self.ex.weights
        peak = self.ex.memory.report() if self.ex.memory is not None else {}
        outputs = None
        if self.plan.forward_only and self.ex.parts.eval_outputs is not None:
            groups = self.ex.groups
            mine = (
                [self.eval_outputs[j] for j in range(self.plan.microbatches)] if self.eval_outputs else None
            )
            outputs = broadcast_object(  # filled on the last stage
                mine, groups.pipeline_ranks[-1], groups.pipeline_group, self.ex.watch,
                "the evaluation outputs broadcast", self.ex.device,
            )  # fmt: skip
        return StepResult(
            loss=w.text * text + w.generator * gen,
            text_loss=text,
            generator_loss=gen,
            text_targets=self.text_targets,
            generator_targets=self.gen_targets,
            activation_peak=peak,
            eval_outputs=outputs,
        )
