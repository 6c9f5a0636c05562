"""Nested schedules: encoder and generator data-parallel over the pipeline ranks (``ideal``, ``bigmac``).

The LLM runs Megatron's (interleaved) 1F1B order, never reordered; encoder and generator work
runs in *columns*, one microbatch of a group per rank (docs/schedules.md, "The nested schedule"):

* ``GEN(g)`` is released when the last stage has finished the forwards of every microbatch of
  group ``g``; each owner runs ``G.j`` (generator forward, loss, backward) and the last stage's
  backward of ``j`` waits for it. Releasing a whole group at once is why the LLM warm-up must be
  longer than Megatron's: otherwise the last stage would wait for a backward whose gradient
  needs forwards it has not yet run.
* bigmac: ``EF`` columns of groups ``0..W-1`` run first; ``EB(g)`` is released when stage 0 has
  finished the backwards of group ``g`` and is followed by ``EF(g + W)``. At most W microbatches
  of encoder activations are alive per rank, whatever M.
* ideal: every ``EF`` first and every ``EB`` last (unlimited memory, the compute reference).

Frozen modules leave ops out (:func:`~lightning_bigmac.schedule.plan.step_kinds`). A frozen
encoder has no ``EB`` column: stage 0 is done with group ``g``'s encoder outputs once it has run
their forwards, which then release ``EF(g + W)`` (W bounds the encoder outputs in flight). Without
LLM backwards (the LLM and the encoder frozen) the LLM order is the forwards alone, and the
generator columns need no longer warm-up.

The two knobs, W and the per-rank warm-up extension, are searched: a candidate is safe when
the event replay finishes (every column is released only after its inputs exist, so the only
way to stop is a dependency cycle) and the validator then proves the result independently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from .config import ScheduleConfig
from .costs import OpCosts
from .dataflow import DataFlow, default_owners
from .engine import Deadlock, Interval, replay
from .orders import one_f_one_b_order
from .plan import EB, EF, B, F, G, Op, Plan
from .simulate import simulate

__all__ = ["build_nested", "smallest"]


class _Columns:
    """Releases generator columns (and bigmac's encoder columns) as the LLM makes progress."""

    def __init__(self, cfg: ScheduleConfig, owners: Sequence[int], warm_groups: int | None):
        self.cfg, self.owners, self.warm = cfg, owners, warm_groups
        self.last_fwd = [0] * cfg.groups  # last-stage forwards finished per group
        self.backward = EB in cfg.kinds.run
        self.release = B if self.backward else F  # stage 0's last op that reads a group's encoder work
        self.done = [0] * cfg.groups  # stage-0 ops of kind `release` finished per group

    def column(self, kind: str, g: int) -> list[tuple[int, Op]]:
        p = self.cfg.pp
        return [(self.owners[j], Op(kind, j)) for j in range(g * p, (g + 1) * p)]

    def on_finish(self, rank: int, op: Op, end: float) -> list[tuple[int, Op]]:
        cfg, g = self.cfg, op.microbatch // self.cfg.pp
        out: list[tuple[int, Op]] = []
        if cfg.generator and op.kind == F and rank == cfg.pp - 1 and op.chunk == cfg.vpp - 1:
            self.last_fwd[g] += 1
            if self.last_fwd[g] == cfg.pp:
                out += self.column(G, g)
        if self.warm is not None and cfg.encoder and op.kind == self.release and rank == 0 and op.chunk == 0:
            self.done[g] += 1
            if self.done[g] == cfg.pp:
                out += self.column(EB, g) if self.backward else []
                if g + self.warm < cfg.groups:
                    out += self.column(EF, g + self.warm)
        return out


def _extension(cfg: ScheduleConfig, spec: str | int | Sequence[int]) -> list[int]:
    if spec == "group":
        return [cfg.pp] * cfg.pp
    if isinstance(spec, int):
        return [spec] * cfg.pp
    return [int(x) for x in spec]


def _lookahead(cfg: ScheduleConfig) -> bool:
    """Whether the last stage's backwards wait for generator columns (which then need a longer warm-up)."""
    return cfg.generator and B in cfg.kinds.run


def _ideal_extension(cfg: ScheduleConfig) -> list[int]:
    """ideal's automatic warm-up: one group of look-ahead for the generator columns, none without."""
    return [cfg.pp if _lookahead(cfg) else 0] * cfg.pp


class _Search:
    """Replays candidates of one config. Deadlock checks run on a probe of a few groups.

    Whether a candidate deadlocks is structural (columns are released only once their inputs
    exist, so durations cannot create or remove a cycle) and shows up within the first groups;
    the probe keeps enough groups for warm-up, a steady phase and the drain. The final plan is
    always replayed and validated at full size.
    """

    def __init__(self, cfg: ScheduleConfig, owners: Sequence[int], costs: OpCosts):
        self.cfg, self.owners, self.costs = cfg, tuple(owners), costs
        probe_groups = min(cfg.groups, cfg.vpp + 4)
        self.probe = replace(cfg, microbatches=probe_groups * cfg.pp, owners=None, encoder_warmup=None)
        self._full: dict[tuple[tuple[int, ...], int | None], list[list[Interval]]] = {}

    def run(
        self, ext: Sequence[int], warm: int | None, cfg: ScheduleConfig | None = None
    ) -> list[list[Interval]]:
        """Event-replay one candidate; ``warm=None`` means ideal (all EF first, all EB last)."""
        cfg = cfg or self.cfg
        p, groups, owners, run = cfg.pp, cfg.groups, self.owners[: cfg.microbatches], cfg.kinds.run
        flow = DataFlow(
            p, cfg.vpp, cfg.microbatches, cfg.encoder, cfg.generator, owners, owners, frozen=cfg.frozen
        )
        static = []
        for r in range(p):
            mine = [j for j in range(cfg.microbatches) if owners[j] == r]
            head = (
                [Op(EF, j) for j in mine if j // p < (groups if warm is None else warm)]
                if cfg.encoder
                else []
            )
            tail = [Op(EB, j) for j in mine] if EB in run and warm is None else []
            llm = [op for op in one_f_one_b_order(r, p, cfg.vpp, cfg.microbatches, ext[r]) if op.kind in run]
            static.append(head + llm + tail)
        return replay(static, flow, self.costs, _Columns(cfg, owners, warm))

    def safe(self, ext: Sequence[int], warm: int | None) -> bool:
        try:
            self.run(ext, None if warm is None else min(warm, self.probe.groups), self.probe)
        except Deadlock:
            return False
        return True

    def full(self, ext: Sequence[int], warm: int | None) -> list[list[Interval]]:
        """The full-size replay of a candidate the probe called safe (cached: the search revisits)."""
        key = (tuple(ext), warm)
        if key not in self._full:
            try:
                self._full[key] = self.run(ext, warm)
            except Deadlock as err:  # the probe said safe: the probe is too short for this config
                raise AssertionError(
                    f"knob search accepted a deadlocking candidate for {self.cfg}: {err}"
                ) from err
        return self._full[key]

    def makespan(self, ext: Sequence[int], warm: int | None) -> float:
        """Step time of the built candidate, an upper bound on :func:`simulate`'s for its plan."""
        return max(iv.end for row in self.full(ext, warm) for iv in row)

    def plan(self, ext: Sequence[int], warm: int | None, **knobs) -> Plan:
        cfg = self.cfg
        rows = self.full(ext, warm)
        knobs = {"llm_warmup": list(ext), "encoder_warmup": cfg.groups if warm is None else warm, **knobs}
        ranks = tuple(tuple(iv.op for iv in row) for row in rows)
        return Plan(
            cfg.schedule, cfg.pp, cfg.vpp, cfg.microbatches, ranks, cfg.encoder, cfg.generator, knobs,
            frozen=cfg.frozen,
        )  # fmt: skip


def smallest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """Smallest x in [lo, hi] with ok(x), given ok is monotone and ok(hi) holds (a binary search;
    where ok is only nearly monotone, a small x it passes over is not found)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _minimal_extension(search: _Search) -> list[int]:
    """Smallest per-rank warm-up extension that is deadlock-free with every encoder group warm.

    Without a generator no extension is needed. With one, start from one group on every rank
    (the paper's choice) and lower each rank's extension, last rank first, while it stays safe.
    """
    cfg = search.cfg
    ext = [0] * cfg.pp
    if not _lookahead(cfg):
        return ext
    ext = [cfg.pp] * cfg.pp
    if not search.safe(ext, None):
        raise AssertionError(f"one extra group of warm-up deadlocks for {cfg}")
    for r in reversed(range(cfg.pp)):
        ext[r] = smallest(0, ext[r], lambda x, r=r: search.safe([*ext[:r], x, *ext[r + 1 :]], None))
    return ext


def build_nested(cfg: ScheduleConfig, costs: OpCosts) -> Plan:
    """Build ``ideal`` or ``bigmac`` for ``cfg``, choosing the knobs the user left free.

    ``ideal`` warms the LLM up by one group when there is a generator (``"auto"``). bigmac's
    ``"auto"`` warm-up is the smallest extension, equal on every rank, that is deadlock-free and
    keeps the step within 2% of ideal (with every encoder group warm), plus one forward on the
    first ranks where the costs' transfer latency makes that faster (:func:`_hide_latency`);
    its automatic W is then the smallest deadlock-free W within 2% of ideal. Where ideal is out
    of reach the target becomes 2% of the best candidate, and ``knobs["rule"]`` says so.
    """
    owners = tuple(cfg.owners) if cfg.owners is not None else default_owners(cfg.microbatches, cfg.pp)
    search, groups, p = _Search(cfg, owners, costs), cfg.groups, cfg.pp
    spec = cfg.llm_warmup
    if cfg.schedule == "ideal":
        ext = _ideal_extension(cfg) if spec == "auto" else _extension(cfg, spec)
        if spec not in ("auto", "minimal") and not search.safe(ext, None):
            raise _unsafe_extension(cfg, ext, _minimal_extension(search))
        return search.plan(_minimal_extension(search) if spec == "minimal" else ext, None)

    ideal = simulate(search.plan(_ideal_extension(cfg), None), costs, check=False).step_time
    rule = "within 2% of ideal"
    if spec == "auto":
        if not _lookahead(cfg):
            ext = [0] * p
        else:
            floor = smallest(0, p, lambda k: search.safe([k] * p, None))
            best = search.makespan([p] * p, groups)
            target = 1.02 * ideal
            if best > target:
                target, rule = 1.02 * best, "within 2% of the best candidate (ideal is out of reach)"
            ext = [smallest(floor, p, lambda k: search.makespan([k] * p, groups) <= target)] * p
            if costs.latency > 0:
                ext = _hide_latency(search, ext)
    elif spec == "minimal":
        ext = _minimal_extension(search)
    else:
        ext = _extension(cfg, spec)
        if not search.safe(ext, None):
            raise _unsafe_extension(cfg, ext, _minimal_extension(search))
    if not cfg.encoder:
        return search.plan(ext, groups, rule=rule)

    w_safe = smallest(1, groups, lambda w: search.safe(ext, w))
    if cfg.encoder_warmup is not None:
        if cfg.encoder_warmup < w_safe:
            raise ValueError(
                f"encoder_warmup={cfg.encoder_warmup} deadlocks with LLM warm-up extension {ext}: stage 0 "
                f"would wait for encoder outputs of a group whose encoder forward waits on stage 0. "
                f"The smallest safe value is {w_safe}"
            )
        return search.plan(ext, cfg.encoder_warmup, encoder_warmup_safe=w_safe)
    target = 1.02 * ideal
    best = search.makespan(ext, groups)
    if best > target:
        target, rule = 1.02 * best, "within 2% of the best candidate (ideal is out of reach)"
    fits = lambda w: search.makespan(ext, w) <= target  # noqa: E731
    w = w_safe if fits(w_safe) else smallest(w_safe + 1, groups, fits)  # the smallest safe W usually fits
    return search.plan(ext, w, encoder_warmup_safe=w_safe, rule=rule)


def _hide_latency(search: _Search, ext: list[int]) -> list[int]:
    """``ext`` plus one warm-up forward on ranks ``0..k-1`` for the ``k`` that shortens the step
    most, if by 0.5% or more (else ``ext``).

    With one forward in hand beyond the 1F1B minimum, a rank's next forward input arrives a
    transfer after the backward it waits on, so every microbatch pays two transfer latencies on
    the critical path; an earlier stage that runs one forward further ahead (as Megatron's 1F1B
    warms up earlier stages more) hides them. Costs one microbatch's LLM activations per bumped
    rank; without latency in the costs it never pays off, so it is not tried.
    """
    groups = search.cfg.groups
    best, best_time = ext, 0.995 * search.makespan(ext, groups)
    for k in range(1, search.cfg.pp):
        bumped = [e + 1 if r < k else e for r, e in enumerate(ext)]
        if search.safe(bumped, None) and search.makespan(bumped, groups) < best_time:
            best, best_time = bumped, search.makespan(bumped, groups)
    return best


def _unsafe_extension(cfg: ScheduleConfig, ext: list[int], floor: list[int]) -> ValueError:
    return ValueError(
        f"llm_warmup={cfg.llm_warmup!r} (extension {ext} per rank) deadlocks: the last stage would wait "
        f"for generator gradients of forwards it has not run. The smallest safe extension is {floor} "
        "(llm_warmup='minimal')"
    )
