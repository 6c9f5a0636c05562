"""From a stream of elements to steps: buffering, bad input, the end of an epoch, exact resume.

Both adapters (the map-style batch sampler and the stream wrapper) run this engine; they only
differ in where elements come from and which replica's share they hand out.

Each element of an epoch gets an *ordinal*, its position in the source. The engine buffers
described elements in ordinal order, reads ``lookahead`` steps' worth of tokens ahead, and plans
a step from the front of the buffer (:func:`~balancer.packing.pack`); samples the packer could not
place stay at the front for the next step. When the source is exhausted every remaining sample
is planned at once into as many steps as its tokens need, each with the full ``M`` microbatches
per replica, so an epoch loses nothing and every step has the same shape.

The state after a step is plain JSON: the epoch, the steps done, how many source elements were
read, the ordinals still buffered and any steps already planned. Resuming re-reads the source up
to that point, describing (decoding) only the buffered elements, and continues identically.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, NamedTuple, TypeVar

from .config import BalancerConfig
from .cost import SampleCost
from .packing import pack
from .samples import CorruptSample, Sample

__all__ = [
    "STATE_FORMAT",
    "Adapter",
    "CorruptSample",
    "Describe",
    "Skipped",
    "SkippedSampleWarning",
    "StepBatch",
    "StepPlanner",
    "epoch_done",
    "make_state",
]

STATE_FORMAT = "bigmac-balancer/1"

T = TypeVar("T")
U = TypeVar("U")


class SkippedSampleWarning(UserWarning):
    """An element was skipped (corrupt, oversize, damaged, in a broken shard); the state counts them."""


@dataclass(frozen=True)
class Skipped:
    """Yielded by a source in place of elements it could not read, e.g. the rest of a broken shard."""

    reason: str
    """Counter name, e.g. ``"broken_shard"``."""
    key: str
    """What was lost (a shard URL, a sample key), for the warning."""
    detail: str = ""


Describe = Callable[[Any], tuple[Any, Sample]]
"""Element -> (what the step carries for it, its descriptor). Raise :class:`CorruptSample` for bad data."""


@dataclass(frozen=True)
class StepBatch(Generic[T]):
    """One optimizer step of one data-parallel replica: what the strategy consumes."""

    microbatches: tuple[T, ...]
    """``M`` microbatches in execution order; from the adapters each is a tuple of items
    (dataset indices, or stream elements), after :meth:`map` whatever the function returned."""
    samples: tuple[tuple[Sample, ...], ...]
    """Descriptors, shaped like the microbatches. A truncated sample's ``text_tokens`` is the
    length to cut its text to."""
    owners: tuple[int, ...]
    """Pipeline rank running microbatch ``j``'s encoder and generator work; a permutation of
    ranks within each group of ``P`` consecutive microbatches."""
    epoch: int
    step: int
    """Index of this step within its epoch."""
    state: Mapping[str, Any]
    """The adapter's state right after this step: ``load_state_dict(state)`` resumes at the next
    one. Carried here because data-loader workers and prefetching run ahead of training."""

    @property
    def keys(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(s.key for s in mb) for mb in self.samples)

    def map(self, fn: Callable[[T], U]) -> StepBatch[U]:
        """Apply ``fn`` to every microbatch (e.g. a collate function), keeping owners and descriptors."""
        return replace(self, microbatches=tuple(fn(mb) for mb in self.microbatches))  # type: ignore[return-value]

    def to(self, *args: Any, **kwargs: Any) -> StepBatch[T]:
        """A copy with every tensor in the microbatches moved by ``tensor.to(*args, **kwargs)``.

        Lightning moves a batch to its device by calling ``to`` on any object that has one; a
        frozen dataclass without it would be rebuilt field by field, which fails. Descriptors,
        owners and state stay as they are.
        """
        import torch  # only a torch caller moves tensors: ``import balancer`` needs numpy only
        from torch.utils._pytree import tree_map

        def move(x: Any) -> Any:
            return x.to(*args, **kwargs) if isinstance(x, torch.Tensor) else x

        return replace(self, microbatches=tuple(tree_map(move, mb) for mb in self.microbatches))


class _Entry(NamedTuple):
    ordinal: int
    item: Any
    sample: Sample
    cost: SampleCost


_Planned = list[tuple[list[list[_Entry]], tuple[int, ...]]]
"""One planned step: per replica, its microbatches and owners."""


class StepPlanner:
    """Plans the steps of one epoch for ``replicas`` data-parallel replicas from one element stream.

    ``where`` names the stream in errors (e.g. ``"dp_rank 1"``).
    """

    def __init__(self, config: BalancerConfig, *, replicas: int, describe: Describe, where: str):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.config, self.replicas, self.describe, self.where = config, replicas, describe, where

    # ---- reading ----------------------------------------------------------------------------
    def _admit(self, ordinal: int, element: Any, counters: dict[str, int]) -> _Entry | None:
        """Describe one element and apply the bad-input policies; None when it is skipped."""
        if isinstance(element, Skipped):
            self._skip(counters, element.reason, element.key, element.detail)
            return None
        try:
            item, sample = self.describe(element)
        except CorruptSample as err:
            self._skip(counters, "corrupt", err.key, err.detail)
            return None
        cfg = self.config
        cost = cfg.cost_model.cost(sample)
        if cost.tokens <= cfg.token_cap:
            return _Entry(ordinal, item, sample, cost)
        over = f"{cost.tokens} LLM tokens > token_cap={cfg.token_cap}"
        if cfg.oversize == "error":
            raise ValueError(
                f"sample {sample.key!r} has {over} ({sample.text_tokens} text tokens plus image/video "
                "tokens): raise token_cap, or set oversize='skip' or 'truncate'"
            )
        if cfg.oversize == "truncate" and cost.tokens - sample.text_tokens <= cfg.token_cap:
            sample = sample.with_text_tokens(sample.text_tokens - (cost.tokens - cfg.token_cap))
            counters["truncated"] = counters.get("truncated", 0) + 1
            return _Entry(ordinal, item, sample, cfg.cost_model.cost(sample))
        why = (
            "its images and videos alone exceed the cap" if cfg.oversize == "truncate" else "oversize='skip'"
        )
        self._skip(counters, "oversize", sample.key, f"{over}; {why}")
        return None

    def _skip(self, counters: dict[str, int], reason: str, key: str, detail: str) -> None:
        counters[reason] = counters.get(reason, 0) + 1
        warnings.warn(
            f"balancer ({self.where}): skipped {key!r} ({reason}: {detail}); "
            f"{counters[reason]} {reason} so far",
            SkippedSampleWarning,
            stacklevel=4,
        )

    # ---- planning ---------------------------------------------------------------------------
    def _plan(self, entries: Sequence[_Entry], replicas: int) -> tuple[list[_Planned], list[_Entry]]:
        """Pack ``entries`` into ``replicas // self.replicas`` steps; also returns the unplaced entries."""
        result = pack([e.cost for e in entries], self.config, replicas=replicas)
        shares = [([[entries[i] for i in mb] for mb in r.microbatches], r.owners) for r in result.replicas]
        steps = [shares[k : k + self.replicas] for k in range(0, replicas, self.replicas)]
        return steps, [entries[i] for i in result.unplaced]

    def _plan_tail(self, buffer: list[_Entry]) -> list[_Planned]:
        """Every remaining sample into the fewest full steps its tokens need."""
        per_step = self.replicas * self.config.microbatches
        most = len(buffer) // per_step
        tokens = sum(e.cost.tokens for e in buffer)
        k = max(1, min(most, math.ceil(tokens / (self.config.step_tokens * self.replicas))))
        while True:
            steps, unplaced = self._plan(buffer, k * self.replicas)
            if not unplaced:
                return steps
            if k == most:
                raise ValueError(
                    f"{self.where}: the last {len(buffer)} samples of the epoch ({tokens} tokens) do not fit "
                    f"{k} step(s) of {per_step} microbatches of token_cap={self.config.token_cap} without "
                    "leaving a microbatch empty: raise token_cap or lower microbatches"
                )
            k += 1

    # ---- the epoch --------------------------------------------------------------------------
    def run(
        self, elements: Iterable[Any], epoch: int, resume: Mapping[str, Any] | None = None
    ) -> Iterator[tuple[_Planned, dict[str, Any]]]:
        """Yield each step of ``epoch`` (every replica's share) with the state right after it."""
        cfg, per_step = self.config, self.replicas * self.config.microbatches
        budget = cfg.step_tokens * self.replicas
        source = iter(elements)
        buffer: list[_Entry] = []
        planned: deque[_Planned] = deque()
        counters: dict[str, int] = {}
        consumed = step = 0
        if resume is not None:
            consumed, step, counters = resume["consumed"], resume["step"], dict(resume["counters"])
            buffer, planned = self._restore(source, resume)

        def state() -> dict[str, Any]:
            return make_state(epoch, step, consumed, buffer, planned, counters)

        exhausted = False
        buffered_tokens = sum(e.cost.tokens for e in buffer)
        while True:
            while planned:
                plan = planned.popleft()
                step += 1
                yield plan, state()
            while not exhausted and (
                buffered_tokens < (1 + cfg.lookahead) * budget or len(buffer) < 2 * per_step
            ):
                element = next(source, _END)
                if element is _END:
                    exhausted = True
                    break
                entry = self._admit(consumed, element, counters)
                consumed += 1
                if entry is not None:
                    buffer.append(entry)
                    buffered_tokens += entry.cost.tokens
            if not buffer:
                break
            if exhausted:
                if len(buffer) < per_step:
                    raise ValueError(
                        f"{self.where}: epoch {epoch} has {len(buffer)} usable samples left, fewer than "
                        f"the {per_step} microbatches of one step ({self.replicas} replica(s) x "
                        f"{cfg.microbatches}); lower microbatches or add data (skipped: {counters or 'none'})"
                    )
                planned.extend(self._plan_tail(buffer))
                buffer, buffered_tokens = [], 0
                continue
            # take the front of the buffer up to the step's token budget: at least one sample per
            # microbatch, and leave at least as many behind so the epoch's last step can be full
            n, tokens = 0, 0
            while n < len(buffer) - per_step and (n < per_step or tokens + buffer[n].cost.tokens <= budget):
                tokens += buffer[n].cost.tokens
                n += 1
            steps, unplaced = self._plan(buffer[:n], self.replicas)
            planned.extend(steps)
            buffer = unplaced + buffer[n:]  # unplaced came from the front: ordinal order holds
            buffered_tokens = sum(e.cost.tokens for e in buffer)
        if step == 0:
            raise ValueError(
                f"{self.where}: epoch {epoch} yielded no usable samples ({consumed} elements read, skipped: "
                f"{counters or 'none'}): check the data source and its paths"
            )

    def _restore(
        self, source: Iterator[Any], state: Mapping[str, Any]
    ) -> tuple[list[_Entry], deque[_Planned]]:
        """Re-read the source up to ``state["consumed"]``, describing only what the state still holds."""
        keep = set(state["buffer"])
        for plan in state["planned"]:
            for mbs, _ in plan:
                keep.update(o for mb in mbs for o in mb)
        entries: dict[int, _Entry] = {}
        scratch: dict[str, int] = {}  # re-admitting must not count twice
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedSampleWarning)
            for ordinal in range(state["consumed"]):
                element = next(source, _END)
                if element is _END:
                    raise ValueError(
                        f"{self.where}: cannot resume epoch {state['epoch']}: the source ended after "
                        f"{ordinal} elements but the state had read {state['consumed']}; resume with the "
                        "same data and seed"
                    )
                if ordinal in keep:
                    entry = self._admit(ordinal, element, scratch)
                    if entry is None:
                        raise ValueError(
                            f"{self.where}: cannot resume: element {ordinal} was usable when the state was "
                            "saved but is not now; resume with the same data and balancer config"
                        )
                    entries[ordinal] = entry
        buffer = [entries[o] for o in state["buffer"]]
        planned = deque(
            [([[entries[o] for o in mb] for mb in mbs], tuple(owners)) for mbs, owners in plan]
            for plan in state["planned"]
        )
        if not all(self._fits(plan) for plan in planned):
            # saved on another layout (replicas, pipeline size or M): its planned steps go back to
            # the buffer and are planned again, so no sample is lost or trained twice
            buffer = sorted([e for plan in planned for mbs, _ in plan for mb in mbs for e in mb] + buffer)
            planned.clear()
        return buffer, planned

    def _fits(self, plan: _Planned) -> bool:
        """Whether a planned step has this planner's shape: a share per replica, M microbatches
        each, and owners that permute the pipeline ranks within every group."""
        p, m = self.config.pipeline_size, self.config.microbatches
        groups = [list(owners[g : g + p]) for _, owners in plan for g in range(0, len(owners), p)]
        shaped = len(plan) == self.replicas and all(len(mbs) == m == len(owners) for mbs, owners in plan)
        return shaped and all(sorted(group) == list(range(p)) for group in groups)


_END = object()


def make_state(
    epoch: int,
    step: int,
    consumed: int,
    buffer: Iterable[_Entry] = (),
    planned: Iterable[_Planned] = (),
    counters: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The JSON state after ``step`` steps of ``epoch``: ``make_state(epoch, 0, 0)`` is a fresh epoch."""
    return {
        "format": STATE_FORMAT,
        "epoch": epoch,
        "step": step,
        "consumed": consumed,
        "buffer": [e.ordinal for e in buffer],
        "planned": [
            [[[[e.ordinal for e in mb] for mb in mbs], list(owners)] for mbs, owners in plan]
            for plan in planned
        ],
        "counters": dict(counters or {}),
    }


def epoch_done(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is the one after its epoch's last step: nothing is buffered or planned.

    Resuming it yields an empty rest of that epoch (right for a loop that counts epochs itself);
    a loop that has moved on resumes the next epoch instead, ``make_state(state["epoch"] + 1, 0, 0)``.
    """
    return state["step"] > 0 and not state["buffer"] and not state["planned"]


class Adapter(Generic[T]):
    """Epochs, resume and state for one replica's share of a :class:`StepPlanner`'s steps.

    A full pass over the iterator finishes an epoch and moves on to the next; ``set_epoch``
    picks one explicitly (as Lightning and ``DistributedSampler`` users do).
    """

    def __init__(self, planner: StepPlanner, share: int):
        self._planner, self._share = planner, share
        self._epoch = 0
        self._resume: Mapping[str, Any] | None = None
        self._last: dict[str, Any] | None = None

    def _elements(self, epoch: int) -> Iterable[Any]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Run ``epoch`` next (from a loaded state if it is for this epoch, else from its start)."""
        if epoch != self._epoch:
            self._epoch, self._last = int(epoch), None

    def __iter__(self) -> Iterator[StepBatch[tuple[T, ...]]]:
        epoch = self._epoch
        resume = self._resume if self._resume is not None and self._resume["epoch"] == epoch else None
        self._resume = None
        for plan, state in self._planner.run(self._elements(epoch), epoch, resume):
            microbatches, owners = plan[self._share]
            self._last = state
            yield StepBatch(
                microbatches=tuple(tuple(e.item for e in mb) for mb in microbatches),
                samples=tuple(tuple(e.sample for e in mb) for mb in microbatches),
                owners=owners,
                epoch=epoch,
                step=state["step"] - 1,
                state=state,
            )
        self._epoch, self._last = epoch + 1, None

    def state_dict(self) -> dict[str, Any]:
        """The state after the last step this object yielded (see :attr:`StepBatch.state` with workers)."""
        if self._last is not None:
            return dict(self._last)
        return dict(self._resume) if self._resume is not None else make_state(self._epoch, 0, 0)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at the step after the one ``state`` was taken at (same data, seed and config)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} balancer state (format={state.get('format')!r})")
        self._epoch, self._resume, self._last = int(state["epoch"]), dict(state), None
