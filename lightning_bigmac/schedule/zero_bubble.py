"""``bigmac_zb``: the nested schedule with every backward split and the weight gradients in the bubbles.

Zero-bubble pipelining (Qi et al., arXiv 2401.10241) splits an LLM stage's backward into the
input-gradient op ``I`` (the stage upstream waits for it) and the weight-gradient op ``W`` (nothing
waits for it). The nested schedule has two more kinds of work without a consumer: the encoder
backward ``EB`` (pixels need no gradient) and, once ``GI`` has sent the gradient of its input
back, the generator's weight gradients ``GW``. All three wait for a bubble, within two caps:

* ``held_columns`` (K): encoder microbatches a rank holds from ``EF`` to ``EB``, and generator
  microbatches from ``GI`` to ``GW``: at most K of each, whatever M;
* ``weight_deferral`` (d): LLM units a rank holds from ``F`` to ``W`` beyond Megatron's 1F1B peak
  on that rank (d = 0: 1F1B's memory, as ZB-H1).

The plan is the order in which a greedy list scheduler runs the ops on the simulator's clock. At
every op boundary a rank runs the first of

1. its next ``I`` (Megatron's backward order), once the gradient has arrived;
2. a ``GI`` whose hidden states have arrived (the last stage's ``I`` waits for it), or, with K
   generator microbatches held, the oldest ``GW``;
3. its next ``F`` (Megatron's forward order), once its input has arrived, or, at the LLM cap,
   the oldest ``W``;
4. its next ``EF``, or, with K encoder microbatches held, the oldest ready ``EB``;
5. the oldest ready ``W``, ``GW`` or ``EB``;

where 4 and 5 start only if at least :data:`FIT` of the op ends before the next input of 1-3
already on its way arrives; the rank waits when nothing qualifies. The rank's LLM ops keep
Megatron's order within each direction; only how forwards and backwards interleave, and where the
deferred work goes, follow the clock.
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

from .config import ScheduleConfig
from .costs import OpCosts
from .dataflow import DataFlow, PlacedOp, default_owners
from .engine import Deadlock, Interval
from .nested import build_nested, smallest
from .orders import llm_sequence, megatron_warmup
from .plan import EB, EF, GI, GW, F, I, Op, Plan, W

__all__ = ["build_zero_bubble"]

TOLERANCE = 0.005
"""Automatic caps: the smallest whose step is within this fraction of the largest cap's."""
FIT = 0.5
"""Part of a deferred op (or an ``EF``) that must fit before the next ``I``, ``F`` or ``GI`` input
already on its way arrives for the op to start now. 1 never delays critical work but leaves gaps
idle; 0 fills every gap and lets long encoder ops hold up the pipeline. 0.5 stayed within 0.3%
of 0 on unit and encoder-heavy costs and cut the example's profiled P=8 steps by 8-13%
(docs/schedules.md)."""
PROBE_GROUPS = (4, 8)
"""Groups of the probe steps the automatic caps are chosen on (M = 4P and 8P): a cap must cost
little in both, where fill and drain weigh most and where the steady phase does; the caps then
do not depend on M, and the search stays fast at any M."""


class _Rank:
    """One rank's queues and live microbatch counts during a replay."""

    def __init__(self, rank: int, cfg: ScheduleConfig, owners: Sequence[int], llm_cap: int, ops: int):
        self.fwd = llm_sequence(F, cfg.pp, cfg.vpp, cfg.microbatches)
        self.bwd = llm_sequence(I, cfg.pp, cfg.vpp, cfg.microbatches) if I in cfg.kinds.run else []
        mine = [j for j in range(cfg.microbatches) if owners[j] == rank]
        self.encoder = [Op(EF, j) for j in mine] if cfg.encoder else []
        self.opens, self.closes = cfg.kinds.opens, cfg.kinds.closes
        self.nf = self.nb = self.ne = 0
        self.columns: list[Op] = []  # GI ops whose hidden states are on their way
        self.deferred: deque[Op] = deque()  # W, GW, EB whose inputs are on their way, oldest first
        self.live = {"llm": 0, "encoder": 0, "generator": 0}
        self.llm_cap = llm_cap
        self.free_at = 0.0
        self.left = ops

    def take(self, op: Op) -> None:
        """Move ``op`` off its queue and book its memory. An op allocates when it starts and frees
        when it ends; the rank decides again only after it ends, so both are booked at once."""
        kind = op.kind
        if kind == F:
            self.nf += 1
        elif kind == I:
            self.nb += 1
        elif kind == EF:
            self.ne += 1
        elif kind == GI:
            self.columns.remove(op)
        else:
            self.deferred.remove(op)
        self.live[op.module] += (kind in self.opens) - (kind in self.closes)


class _Greedy:
    """The greedy list scheduler for one config; replays are cached per pair of caps."""

    def __init__(self, cfg: ScheduleConfig, owners: Sequence[int], costs: OpCosts):
        self.cfg, self.owners, self.costs = cfg, tuple(owners), costs
        self.flow = DataFlow(
            cfg.pp, cfg.vpp, cfg.microbatches, cfg.encoder, cfg.generator, self.owners, self.owners,
            split_backward=True, frozen=cfg.frozen,
        )  # fmt: skip
        placed = self.flow.all_ops()
        self.ops_of = [sum(r == rank for r, _ in placed) for rank in range(cfg.pp)]
        self.inputs = {op: len(self.flow.producers(*op)) for op in placed}
        self.duration = {op: costs.duration(*op, cfg.frozen) for op in placed}
        self._runs: dict[tuple[int, int], list[list[Interval]] | Deadlock] = {}

    def run(self, held: int, deferral: int) -> list[list[Interval]]:
        """Each rank's intervals under caps ``held`` and ``deferral``; raises :class:`Deadlock`."""
        key = (held, deferral)
        if key not in self._runs:
            try:
                self._runs[key] = self._replay(held, deferral)
            except Deadlock as err:
                self._runs[key] = err
        got = self._runs[key]
        if isinstance(got, Deadlock):
            raise got
        return got

    def step_time(self, held: int, deferral: int) -> float:
        """The replay's step time; infinite when the caps deadlock."""
        try:
            return max(iv.end for row in self.run(held, deferral) for iv in row)
        except Deadlock:
            return float("inf")

    def _replay(self, held: int, deferral: int) -> list[list[Interval]]:
        cfg, flow, latency, p = self.cfg, self.flow, self.costs.latency, self.cfg.pp
        ranks = [
            _Rank(r, cfg, self.owners, megatron_warmup(r, p, cfg.vpp, cfg.microbatches) + 1 + deferral, n)
            for r, n in enumerate(self.ops_of)
        ]
        ready: dict[PlacedOp, float] = {k: 0.0 for k, n in self.inputs.items() if n == 0}
        waiting: dict[PlacedOp, tuple[int, float]] = {}  # producers not run yet, latest arrival
        out: list[list[Interval]] = [[] for _ in range(p)]
        wake = [(0.0, r, r) for r in range(p)]
        seq = p
        while wake:
            now, _, r = heapq.heappop(wake)
            me = ranks[r]
            if me.free_at > now or not me.left:
                continue
            op = _pick(me, r, now, ready, held, self.duration)
            if op is None:
                continue
            me.take(op)
            end = now + self.duration[(r, op)]
            me.free_at, me.left = end, me.left - 1
            out[r].append(Interval(r, op, now, end))
            seq += 1
            heapq.heappush(wake, (end, seq, r))
            for key in flow.consumers(r, op):
                n, t = waiting.get(key, (self.inputs[key], 0.0))
                n, t = n - 1, max(t, end + (latency if key[0] != r else 0.0))
                waiting[key] = (n, t)
                if n == 0:
                    ready[key] = t
                    target, c_op = ranks[key[0]], key[1]
                    if c_op.kind == GI:
                        target.columns.append(c_op)
                    elif c_op.kind != F and c_op.kind != I:
                        target.deferred.append(c_op)
                    seq += 1
                    heapq.heappush(wake, (t, seq, key[0]))
        stuck = {r: _blocked(me, ready, flow, r) for r, me in enumerate(ranks) if me.left}
        if stuck:
            raise Deadlock(stuck)
        return out


def _pick(
    me: _Rank, rank: int, now: float, ready: dict[PlacedOp, float], held: int, duration: dict[PlacedOp, float]
) -> Op | None:
    """The op ``me`` (rank ``rank``) runs at ``now`` (the order of the module docstring), or None
    to wait."""

    def arrived(op: Op) -> bool:
        return ready.get((rank, op), now + 1.0) <= now

    def oldest(kind: str | None = None) -> Op | None:
        return next((o for o in me.deferred if (kind is None or o.kind == kind) and arrived(o)), None)

    bwd = me.bwd[me.nb] if me.nb < len(me.bwd) else None
    fwd = me.fwd[me.nf] if me.nf < len(me.fwd) else None
    if bwd is not None and arrived(bwd):
        return bwd
    if any(arrived(o) for o in me.columns):
        if me.live["generator"] < held:
            return next(o for o in me.columns if arrived(o))
        return oldest(GW)
    if fwd is not None and arrived(fwd):
        if me.live["llm"] < me.llm_cap:
            return fwd
        if (w := oldest(W)) is not None:
            return w
    # Deferred work only if enough of it fits before the next critical input on its way arrives:
    # a long encoder op started just before a gradient arrives would hold up the whole pipeline.
    coming = [ready[(rank, o)] for o in (bwd, fwd, *me.columns) if o is not None and (rank, o) in ready]
    deadline = min(coming, default=float("inf"))
    fillers: list[Op | None] = []
    if me.ne < len(me.encoder):
        fillers.append(me.encoder[me.ne] if me.live["encoder"] < held else oldest(EB))
    fillers += [o for o in me.deferred if arrived(o)]
    return next((o for o in fillers if o is not None and now + FIT * duration[(rank, o)] <= deadline), None)


def _blocked(me: _Rank, ready: dict[PlacedOp, float], flow: DataFlow, rank: int) -> tuple[Op, list[PlacedOp]]:
    """A stuck rank's next op and the producers it still waits for (for :class:`Deadlock`)."""
    heads = [*me.bwd[me.nb : me.nb + 1], *me.fwd[me.nf : me.nf + 1], *me.columns, *me.deferred]
    heads += me.encoder[me.ne : me.ne + 1]
    op = heads[0]
    return op, [src for src in flow.producers(rank, op) if (rank, op) not in ready]


def _ceiling(cfg: ScheduleConfig, costs: OpCosts) -> int:
    """bigmac's W for ``cfg`` (its encoder memory), or pp for a step without encoder backwards."""
    if EB not in cfg.kinds.run:
        return cfg.pp
    bigmac = replace(cfg, schedule="bigmac", held_columns=None, weight_deferral=None)
    return int(build_nested(bigmac, costs).knobs["encoder_warmup"])


@lru_cache(maxsize=256)
def _caps(layout: ScheduleConfig, costs_json: str) -> tuple[int, int, int]:
    """(K, d, bigmac's W) for a layout; see :func:`build_zero_bubble`."""
    costs = OpCosts.from_dict(json.loads(costs_json))
    probes = [replace(layout, microbatches=g * layout.pp) for g in PROBE_GROUPS]
    greedy = [_Greedy(cfg, default_owners(cfg.microbatches, cfg.pp), costs) for cfg in probes]
    d_top = layout.weight_deferral if layout.weight_deferral is not None else layout.pp
    ceiling = layout.held_columns if layout.held_columns is not None else _ceiling(probes[0], costs)
    targets = [(1 + TOLERANCE) * g.step_time(ceiling, d_top) for g in greedy]

    def close(k: int, d: int) -> bool:
        return all(g.step_time(k, d) <= t for g, t in zip(greedy, targets, strict=True))

    held, deferral = ceiling, d_top
    if layout.held_columns is None:
        held = smallest(1, ceiling, lambda k: close(k, d_top))
    if layout.weight_deferral is None:
        deferral = smallest(0, layout.pp, lambda d: close(held, d))
    return held, deferral, ceiling


def build_zero_bubble(cfg: ScheduleConfig, costs: OpCosts) -> Plan:
    """Build ``bigmac_zb`` for ``cfg``, choosing the caps the user left free.

    The caps are chosen on probes: the same layout with :data:`PROBE_GROUPS` groups, default
    owners and the costs' means, so that they (and the memory they allow) do not depend on M or
    on one step's data. The reference is K = W (bigmac's W at M = 4P, or the user's K) and
    d = pp (or the user's d); automatic K is the smallest in 1..W, then automatic d the smallest
    in 0..pp, whose step stays within :data:`TOLERANCE` of the reference's on every probe.
    """
    p = cfg.pp
    layout = replace(cfg, microbatches=p, owners=None)
    held, deferral, ceiling = _caps(layout, json.dumps(costs.typical().to_dict(), sort_keys=True))
    owners = tuple(cfg.owners) if cfg.owners is not None else default_owners(cfg.microbatches, p)
    try:
        rows = _Greedy(cfg, owners, costs).run(held, deferral)
    except Deadlock as err:  # caps >= (1, 0) keep every queue moving; this guards the invariant
        raise AssertionError(
            f"held_columns={held}, weight_deferral={deferral} deadlock for {cfg}: {err}"
        ) from err
    knobs = {"held_columns": held, "weight_deferral": deferral}
    if cfg.held_columns is None:
        knobs["held_columns_max"] = ceiling  # bigmac's W: the automatic K's ceiling
    ranks = tuple(tuple(iv.op for iv in row) for row in rows)
    return Plan(
        cfg.schedule, p, cfg.vpp, cfg.microbatches, ranks, cfg.encoder, cfg.generator, knobs,
        split_backward=True, frozen=cfg.frozen,
    )  # fmt: skip
