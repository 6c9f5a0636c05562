"""Gradient synchronisation at the end of a step, in buckets.

LLM chunk gradients are summed over the data-parallel group (the ranks holding the same
stage); encoder and generator gradients over every rank holding a replica (``pp * dp``). The
executor scales the loss by the step's global target counts, so a *sum* is the exact gradient
of one big batch: no averaging here.

Gradients are packed into flat buckets of about ``bucket_bytes`` and reduced one
``all_reduce`` per bucket (one call per parameter would pay the collective's latency hundreds
of times). A parameter without a gradient on this rank (no microbatch used it) contributes
zeros, so every rank of the group posts the same buckets in the same order; each bucket carries
one flag per parameter, so that a parameter no rank produced a gradient for keeps ``.grad`` None
as in one process (an optimizer then skips it: AdamW's weight decay does not move it). Every
all-reduce is bounded by the timeout and names the lost peer (:mod:`.collectives`).

Parameters tied between the embedding and the head (``PipelineParts.tied``) have a copy on the
first and on the last stage's rank. After the data-parallel sum each copy holds the gradient of
its own use; :func:`all_reduce_tied_grads` sums the two, so both copies take the same step, and
:func:`norm_parameters` counts them once in the global norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from .collectives import all_reduce
from .groups import PipelineGroups
from .parts import PipelineParts
from .watch import PeerWatch

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "all_reduce_grads",
    "all_reduce_tied_grads",
    "buckets",
    "clip_grad_norm_",
    "global_grad_norm",
    "norm_parameters",
    "tied_parameters",
]

DEFAULT_BUCKET_BYTES = 25 * 2**20


def buckets(params: Sequence[torch.nn.Parameter], bucket_bytes: int) -> Iterator[list[torch.nn.Parameter]]:
    """Consecutive runs of ``params`` of one dtype and at most ``bucket_bytes`` (a bigger one alone)."""
    run: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if run and (size + nbytes > bucket_bytes or p.dtype != run[0].dtype):
            yield run
            run, size = [], 0
        run.append(p)
        size += nbytes
    if run:
        yield run


def all_reduce_grads(
    params: Sequence[torch.nn.Parameter],
    group: dist.ProcessGroup,
    watch: PeerWatch,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    what: str = "the gradient all-reduce",
) -> int:
    """Sum ``params``' gradients over ``group`` in place; returns the number of collectives issued.

    Every rank of ``group`` must pass the same parameters in the same order (the same modules).
    Afterwards a parameter has a ``.grad`` when any rank produced one (zeros stand in for the
    ranks that did not) and None when none did. ``watch`` bounds each bucket's all-reduce;
    ``what`` names them in its errors.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    params = [p for p in params if p.requires_grad]
    if dist.get_world_size(group) == 1:
        return 0
    calls = 0
    for run in buckets(params, bucket_bytes):
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in run]
        flags = torch.tensor([p.grad is not None for p in run], dtype=run[0].dtype, device=run[0].device)
        flat = torch.cat([*grads, flags])
        all_reduce(flat, group, watch, what)
        calls += 1
        offset, produced = 0, flat[-len(run) :].tolist()
        for p, any_rank in zip(run, produced, strict=True):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p) if any_rank else None
            offset += n
    return calls


def tied_parameters(parts: PipelineParts) -> list[torch.nn.Parameter]:
    """The parameters tied between ``parts.embedding`` and ``parts.head``, in ``parts.tied`` order
    (after placement the embedding names the copy this rank holds, if any)."""
    return [parts.embedding.get_parameter(name) for name, _ in parts.tied]


def all_reduce_tied_grads(
    parts: PipelineParts,
    groups: PipelineGroups,
    watch: PeerWatch,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> int:
    """Sum the tied parameters' gradients over the first and the last stage's ranks of this rank's
    pipeline (``groups.ends_group``); call it after the data-parallel sum. Returns the number of
    collectives: none on the other ranks, at ``pp == 1`` (one copy) or without tied parameters."""
    if groups.ends_group is None or not parts.tied:
        return 0
    what = "the tied embedding gradient all-reduce"
    return all_reduce_grads(tied_parameters(parts), groups.ends_group, watch, bucket_bytes, what)


def norm_parameters(
    llm: Sequence[torch.nn.Parameter], parts: PipelineParts, groups: PipelineGroups
) -> list[torch.nn.Parameter]:
    """This rank's LLM parameters ``llm`` as :func:`global_grad_norm` must count them: a tied
    parameter only on the first stage's rank, not again on the last stage's."""
    if groups.pp == 1 or groups.pipeline_rank != groups.pp - 1 or not parts.tied:
        return list(llm)
    tied = {id(p) for p in tied_parameters(parts)}
    return [p for p in llm if id(p) not in tied]


def _squares(params: Sequence[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    return torch.stack(grads).sum() if grads else torch.zeros((), device=device)


def global_grad_norm(
    llm: Sequence[torch.nn.Parameter],
    replicas: Sequence[torch.nn.Parameter],
    pipeline_group: dist.ProcessGroup,
    device: torch.device,
    watch: PeerWatch,
) -> float:
    """The 2-norm of the whole model's gradient, as one process would compute it (a collective).

    ``llm`` parameters live on one rank of each pipeline (their gradients already summed over the
    replicas; tied ones left out on one of their two ranks, :func:`norm_parameters`): their
    squares are summed over ``pipeline_group``. ``replicas`` (encoder and
    generator) gradients are identical on every rank after the sync, so each rank adds them once.
    ``watch`` (the executor's) bounds the all-reduce and names a lost peer.
    """
    squares = _squares(llm, device)
    all_reduce(squares, pipeline_group, watch, "the gradient norm all-reduce")
    return math.sqrt(float(squares) + float(_squares(replicas, device)))


def clip_grad_norm_(params: Sequence[torch.nn.Parameter], norm: float, max_norm: float) -> None:
    """Scale ``params``' gradients by ``max_norm / norm`` when below 1 (``clip_grad_norm_``'s rule)."""
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
