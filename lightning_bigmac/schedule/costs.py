"""Op durations and activation sizes: what the simulator and the knob search are fed.

Three sources, one type:

* constants (``OpCosts()`` gives unit LLM forwards, backwards twice as long as forwards);
* per-microbatch arrays, e.g. from the balancer's cost model, where encoder work follows the
  image count and LLM work the packed sequence length;
* a profile written by the runtime (``bigmac-profile/1``): measured durations of every op of a
  real step, used verbatim for the ops it covers and averaged per kind for the rest.

A split backward's ops (``I``/``W``, ``GI``/``GW``) take their share of the whole op's duration
(``llm_weight_share``, ``generator_weight_share``); a profile of a split step measures both
parts, and :meth:`OpCosts.from_profile` turns their means into the whole and the share. The
whole backward of a frozen module computes only the gradient of its input: a frozen LLM's ``B``
costs what its ``I`` would, a frozen generator's ``G`` what its ``GI`` would.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .plan import EB, EF, GI, GW, LLM_KINDS, MODULE_OF_KIND, B, F, G, I, Op, W

__all__ = ["PROFILE_FORMAT", "OpCosts", "PerMicrobatch"]

PerMicrobatch = float | Sequence[float]
"""A value for every microbatch (a scalar applies to all of them)."""

PROFILE_FORMAT = "bigmac-profile/1"

# The cost field of each op kind (the simulator reads it; profiles are grouped by it).
KIND_FIELD = {
    EF: "encoder_forward",
    EB: "encoder_backward",
    F: "llm_forward",
    B: "llm_backward",
    G: "generator",
}
_BYTES_FIELD = {"encoder": "encoder_bytes", "llm": "llm_bytes", "generator": "generator_bytes"}
# The parts of a split backward: (input-gradient kind, weight-gradient kind) -> (whole, share field).
_SPLIT_FIELDS = {
    (I, W): ("llm_backward", "llm_weight_share"),
    (GI, GW): ("generator", "generator_weight_share"),
}
_PART = {kind: (pair, pair.index(kind)) for pair in _SPLIT_FIELDS for kind in pair}
_INPUT_HALF = {B: I, G: GI}
"""A whole backward's input-gradient half: all a frozen module's backward computes."""


def _at(value: PerMicrobatch | None, j: int) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    return float(value[j])


@dataclass(frozen=True, kw_only=True)
class OpCosts:
    """Durations (any time unit; seconds when loaded from a profile) and activation sizes."""

    encoder_forward: PerMicrobatch = 1.0
    """Encoder forward of one microbatch on its owner."""
    encoder_backward: PerMicrobatch = 2.0
    """Encoder backward of one microbatch (gradient from stage 0 to the encoder weights)."""
    llm_forward: PerMicrobatch = 1.0
    """Forward of ONE LLM chunk (one stage, 1/(pp*vpp) of the layers) for one microbatch."""
    llm_backward: PerMicrobatch = 2.0
    """Backward of one LLM chunk for one microbatch."""
    generator: PerMicrobatch = 3.0
    """Generator forward + loss + backward of one microbatch, back to back."""
    llm_weight_share: PerMicrobatch = 0.5
    """Part of ``llm_backward`` that computes weight gradients (``W``); the rest is ``I``."""
    generator_weight_share: PerMicrobatch = 1 / 3
    """Part of ``generator`` that computes weight gradients (``GW``: 1 of forward 1 + backward 2)."""
    latency: float = 0.0
    """Time from the end of an op to the start of its consumer on another rank (the transfer)."""
    encoder_bytes: PerMicrobatch | None = None
    """Encoder activations saved for backward per microbatch; None: report peaks in microbatches only."""
    llm_bytes: PerMicrobatch | None = None
    """LLM activations saved for backward per microbatch per chunk."""
    generator_bytes: PerMicrobatch | None = None
    """Generator activations per microbatch (alive only during its G op)."""
    measured: Mapping[str, float] = field(default_factory=dict)
    """Exact durations from a profile, keyed ``"<rank>:<op>"`` for LLM ops and ``"<op>"`` otherwise."""

    def duration(self, rank: int, op: Op, frozen: frozenset[str] = frozenset()) -> float:
        """How long ``op`` takes on ``rank`` in a step whose ``frozen`` modules compute no weight
        gradients (see the module docstring)."""
        key = f"{rank}:{op}" if op.kind in LLM_KINDS else str(op)
        got = self.measured.get(key)
        if got is not None:
            return got
        kind = _INPUT_HALF.get(op.kind, op.kind) if MODULE_OF_KIND[op.kind] in frozen else op.kind
        if kind in _PART:
            pair, weight = _PART[kind]
            whole, share_field = _SPLIT_FIELDS[pair]
            share = _at(getattr(self, share_field), op.microbatch)
            return _at(getattr(self, whole), op.microbatch) * (share if weight else 1.0 - share)
        return _at(getattr(self, KIND_FIELD[kind]), op.microbatch)

    def activation_bytes(self, op: Op) -> float | None:
        """Bytes of activations that ``op``'s module keeps for microbatch ``op.microbatch``."""
        return _at(getattr(self, _BYTES_FIELD[MODULE_OF_KIND[op.kind]]), op.microbatch)

    @property
    def has_bytes(self) -> bool:
        return any(getattr(self, f) is not None for f in _BYTES_FIELD.values())

    def check_length(self, microbatches: int) -> None:
        """Raise ``ValueError`` if a per-microbatch array is shorter than the step."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Sequence) and len(value) < microbatches:
                raise ValueError(
                    f"OpCosts.{f.name} has {len(value)} values but the plan has {microbatches} "
                    "microbatches: give one value per microbatch or a scalar"
                )

    def typical(self) -> OpCosts:
        """These costs for planning *other* steps: every per-microbatch array replaced by its mean
        and the per-op ``measured`` durations dropped (they name the microbatches of the step they
        were measured on, which another step's data does not share); the latency stays."""
        means = {
            f.name: statistics.fmean(value)
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), Sequence) and len(value) > 0
        }
        return replace(self, **means, measured={})

    # ---- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpCosts:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown cost field(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})

    @classmethod
    def from_profile(cls, data: Mapping[str, Any]) -> OpCosts:
        """Costs from a runtime profile: every op's measured duration, per-kind means as fallback.

        The transfer latency is the profile's own ``latency`` entry (0 when it has none). A split
        step's part means give the whole op (their sum) and the weight share.
        """
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a {PROFILE_FORMAT} file (format={data.get('format')!r})")
        measured: dict[str, float] = {}
        per_kind: dict[str, list[float]] = {}
        for ev in data["events"]:
            op = Op.parse(ev["op"])
            d = float(ev["end"]) - float(ev["start"])
            measured[f"{ev['rank']}:{op}" if op.kind in LLM_KINDS else str(op)] = d
            per_kind.setdefault(op.kind, []).append(d)
        mean = {k: statistics.fmean(v) for k, v in per_kind.items()}
        means = {KIND_FIELD[k]: v for k, v in mean.items() if k in KIND_FIELD}
        for backward, forward in (("encoder_backward", "encoder_forward"), ("llm_backward", "llm_forward")):
            if backward not in means and forward in means:  # a frozen step ran none: the default ratio
                means[backward] = 2 * means[forward]
        for (inputs, weights), (whole, share) in _SPLIT_FIELDS.items():
            if inputs in mean and weights in mean and mean[inputs] + mean[weights] > 0:
                means[whole] = mean[inputs] + mean[weights]
                means[share] = mean[weights] / means[whole]
        return cls(**means, latency=float(data.get("latency", 0.0)), measured=measured)

    @classmethod
    def load(cls, path: str | Path) -> OpCosts:
        """Read a cost file (the fields of this class as JSON) or a runtime profile."""
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and "events" in data:
            return cls.from_profile(data)
        return cls.from_dict(data)
