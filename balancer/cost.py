"""Per-sample cost of each module, from patch and token counts; coefficients fitted from a profile.

Every module's cost is linear in its work units plus a quadratic attention term per attention
span, so a microbatch costs the sum over its spans (plus a fixed per-op overhead):

* encoder: a span is one image or one temporal slice of a video (``temporal_patch`` frames share
  one patch grid); its size ``n`` is its patch count. Cost ``linear * n + quadratic * n**2``.
* LLM: what a span is depends on the model's attention mask (:attr:`SampleCostModel.llm_attention`).
  ``"pack"`` (the default): the microbatch is one causal sequence, so a microbatch of sequence
  lengths ``l_i`` costs ``linear * L + quadratic * L**2`` with ``L = sum(l_i)``. This is what the
  project's example model does (``lightning_bigmac.testing.tiny_mllm`` runs
  ``scaled_dot_product_attention(is_causal=True)`` over the whole microbatch) and what any model
  without a document mask does. ``"sample"``: a document mask (varlen attention over
  ``cu_seqlens``) keeps each sample to itself: ``linear * sum(l_i) + quadratic * sum(l_i**2)``.
* generator: a span is one output image's latent grid.

Default coefficients: FLOP ratios for the paper's settings (arXiv 2605.25451: Qwen3-30B-A3B with
a 1.3B ViT, and the same plus a 20B MMDiT generator), in units of one LLM token's forward matmuls,
``2 * 3.3e9 = 6.6e9`` FLOPs (Qwen3-30B-A3B activates 3.3B parameters per token; model card).
Backward costs twice the forward (gradients for inputs and for weights), so backward terms are
twice the forward ones. A (query, key) pair costs ``4 * d`` FLOPs in ``QK^T`` and ``AV`` per layer
of attention width ``d``; a causal mask halves the pairs.

=================  =========  =======================================================================
term               value      derivation
=================  =========  =======================================================================
LLM linear         1.0        the unit
LLM quadratic      5.96e-5    causal, 48 layers, ``d = 32 heads * 128 = 4096`` (Qwen3-30B-A3B
                              config): ``2 * 4096 * 48 / 6.6e9``
encoder linear     0.394      ``2 * 1.3e9 / 6.6e9`` per patch
encoder quadratic  3.7e-5     full attention within an image, ``4 * 1536 * 40 / 6.6e9``; width 1536
                              and 40 layers are assumed (``12 * d**2 * L = 1.13e9``, about 1.3B with
                              embeddings): the paper gives only the parameter count
generator linear   18.0       forward + backward, ``3 * 2 * 20e9 / 6.6e9`` per latent
generator quad.    3.3e-4     ``3 * 4 * 3072 * 60 / 6.6e9``: full attention in a 60-block, width-3072
                              MMDiT (Qwen-Image's layout, a 20B MMDiT)
=================  =========  =======================================================================

Patch 14, merge 2x2 and temporal patch 2 (:class:`Geometry`) are Qwen2-VL's; latents of 16 px are
an 8x VAE with 2x2 latent patches. The ratios ignore overheads, norms and the input embedding
lookup (a few percent) and count FLOPs, not time: fit the coefficients from a real step with
:func:`fit_coefficients` once the runtime has written a profile. Only their ratios matter to the
packer.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from .samples import Sample

__all__ = [
    "LLM_ATTENTION",
    "Coefficients",
    "Geometry",
    "SampleCost",
    "SampleCostModel",
    "Spans",
    "Term",
    "fit_coefficients",
]

LLM_ATTENTION = ("pack", "sample")


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """How pixels become encoder patches, LLM tokens and generator latents (Qwen2-VL-like defaults)."""

    patch_size: int = 14
    """Encoder patch side in pixels."""
    merge: int = 2
    """Encoder patches merged per side into one LLM token (``merge**2`` patches per token)."""
    temporal_patch: int = 2
    """Video frames that share one patch grid (one encoder attention span)."""
    latent_patch: int = 16
    """Pixels per generator latent token side (VAE downsampling times latent patch size)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if int(getattr(self, f.name)) < 1:
                raise ValueError(f"Geometry.{f.name}={getattr(self, f.name)} must be >= 1")

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """``(patches, llm_tokens)`` of one image or video slice, its grid rounded up to whole tokens."""
        side = self.patch_size * self.merge
        tokens = -(-height // side) * -(-width // side)  # ceil division
        return tokens * self.merge * self.merge, tokens

    def latents(self, height: int, width: int) -> int:
        return -(-height // self.latent_patch) * -(-width // self.latent_patch)


class Spans(NamedTuple):
    """A sample's attention spans per module (sizes in patches, tokens and latents)."""

    encoder: tuple[int, ...]
    llm_tokens: int
    generator: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Term:
    """Cost of one op over spans of sizes ``n``: ``overhead + sum(linear * n + quadratic * n**2)``."""

    linear: float = 0.0
    """Cost per unit (patch, token or latent): the matmuls."""
    quadratic: float = 0.0
    """Cost per unit squared within one span: attention."""
    overhead: float = 0.0
    """Fixed cost of one op of a microbatch that has any work for this module (launches, syncs)."""

    def variable(self, spans: Sequence[int]) -> float:
        """The part that adds up over samples (the overhead is paid once per microbatch)."""
        if not spans:
            return 0.0
        return self.linear * sum(spans) + self.quadratic * sum([n * n for n in spans])


@dataclass(frozen=True, kw_only=True)
class Coefficients:
    """One :class:`Term` per op kind of the schedule. Units: one LLM token forward by default."""

    encoder_forward: Term = field(default_factory=lambda: Term(linear=0.394, quadratic=3.7e-5))
    """Encoder forward; spans are images and video slices."""
    encoder_backward: Term = field(default_factory=lambda: Term(linear=0.788, quadratic=7.4e-5))
    """Encoder backward."""
    llm_forward: Term = field(default_factory=lambda: Term(linear=1.0, quadratic=5.96e-5))
    """Forward of the whole LLM (all ``pp * vpp`` chunks); spans are samples."""
    llm_backward: Term = field(default_factory=lambda: Term(linear=2.0, quadratic=1.19e-4))
    """Backward of the whole LLM."""
    generator: Term = field(default_factory=lambda: Term(linear=18.0, quadratic=3.3e-4))
    """Generator forward, loss and backward; spans are output images."""

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {f.name: vars(getattr(self, f.name)).copy() for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, float]]) -> Coefficients:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown coefficient(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: Term(**v) for k, v in data.items()})


class SampleCost(NamedTuple):
    """What the packer balances for one sample (forward plus backward, overheads excluded)."""

    tokens: int
    """LLM sequence length: what the token cap limits."""
    llm: float
    """The sample's additive share of the microbatch's LLM cost. With attention over the pack the
    quadratic term belongs to the microbatch, not the sample, and is left out: a microbatch's LLM
    cost then grows with the sum of these, so balancing the sums balances the cost."""
    encoder: float
    generator: float

    @property
    def owner(self) -> float:
        """Work on the rank that owns the sample's microbatch: its encoder and generator columns."""
        return self.encoder + self.generator


@dataclass(frozen=True, kw_only=True)
class SampleCostModel:
    """Sample descriptor -> per-module cost. ``SampleCostModel()`` uses the documented defaults."""

    geometry: Geometry = field(default_factory=Geometry)
    """Patch, merge and latent sizes."""
    coefficients: Coefficients = field(default_factory=Coefficients)
    """Per op kind cost terms; :func:`fit_coefficients` fits them from a runtime profile."""
    llm_attention: str = "pack"
    """The LLM's attention span within a microbatch: ``"pack"``, one causal sequence over all its
    samples (the example model; any model without a document mask); ``"sample"``, each sample
    attends only to itself (a document mask, varlen attention)."""

    def __post_init__(self) -> None:
        if self.llm_attention not in LLM_ATTENTION:
            raise ValueError(
                f"SampleCostModel.llm_attention={self.llm_attention!r}: use 'pack' (samples of a microbatch "
                "attend to each other) or 'sample' (a document mask keeps each sample to itself)"
            )

    def spans(self, sample: Sample) -> Spans:
        g = self.geometry
        encoder: list[int] = []
        tokens = sample.text_tokens
        for h, w in sample.images:
            patches, t = g.grid(h, w)
            encoder.append(patches)
            tokens += t
        for frames, h, w in sample.videos:
            patches, t = g.grid(h, w)
            slices = -(-frames // g.temporal_patch)
            encoder += [patches] * slices
            tokens += t * slices
        return Spans(tuple(encoder), tokens, tuple(g.latents(h, w) for h, w in sample.outputs))

    @cached_property
    def _round_trip(self) -> tuple[Term, Term]:
        """Encoder and LLM forward plus backward as single terms: one evaluation per sample."""
        c = self.coefficients
        return tuple(
            Term(linear=f.linear + b.linear, quadratic=f.quadratic + b.quadratic)
            for f, b in ((c.encoder_forward, c.encoder_backward), (c.llm_forward, c.llm_backward))
        )

    def cost(self, sample: Sample) -> SampleCost:
        encoder, llm = self._round_trip
        enc, tokens, gen = self.spans(sample)
        return SampleCost(
            tokens=tokens,
            llm=llm.variable((tokens,)) if self.llm_attention == "sample" else llm.linear * tokens,
            encoder=encoder.variable(enc),
            generator=self.coefficients.generator.variable(gen),
        )

    def units(self, microbatch: Sequence[Sample]) -> dict[str, list[int]]:
        """Span sizes of one microbatch per module: ``{"encoder": ..., "llm": ..., "generator": ...}``."""
        spans = [self.spans(s) for s in microbatch]
        llm = [sp.llm_tokens for sp in spans]
        return {
            "encoder": [n for sp in spans for n in sp.encoder],
            "llm": llm if self.llm_attention == "sample" or not llm else [sum(llm)],
            "generator": [n for sp in spans for n in sp.generator],
        }

    def op_costs(self, microbatch: Sequence[Sample]) -> dict[str, float]:
        """Duration of each op kind of one microbatch, overheads included, keyed like :class:`Coefficients`.

        LLM entries are for the whole LLM: the schedule's cost model wants one chunk, i.e. these
        divided by ``pp * vpp``.
        """
        units = self.units(microbatch)
        out = {}
        for f in fields(self.coefficients):
            term, unit = getattr(self.coefficients, f.name), units[_MODULE[f.name]]
            out[f.name] = term.variable(unit) + (term.overhead if unit else 0.0)
        return out


_MODULE = {
    "encoder_forward": "encoder",
    "encoder_backward": "encoder",
    "llm_forward": "llm",
    "llm_backward": "llm",
    "generator": "generator",
}
_OP_FIELD = {
    "EF": "encoder_forward",
    "EB": "encoder_backward",
    "F": "llm_forward",
    "B": "llm_backward",
    "G": "generator",
}


def _nonnegative_lstsq(features: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: the best of the fits on each subset of columns.

    With three columns (overhead, linear, quadratic) trying all subsets is exact NNLS and keeps
    a noisy profile from producing a negative attention cost.
    """
    scale = np.maximum(np.abs(features).max(axis=0), 1e-300)  # Σn² dwarfs Σn: condition the solve
    x = features / scale
    best, best_err = np.zeros(features.shape[1]), float(np.sum(y * y))
    for k in range(1, features.shape[1] + 1):
        for cols in itertools.combinations(range(features.shape[1]), k):
            sol = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
            if (sol < 0).any():
                continue
            err = float(np.sum((x[:, cols] @ sol - y) ** 2))
            if err < best_err:
                best, best_err = np.zeros(features.shape[1]), err
                best[list(cols)] = sol
    return best / scale


def fit_coefficients(
    profile: Mapping[str, Any],
    microbatches: Sequence[Sequence[Sample]],
    *,
    geometry: Geometry | None = None,
    llm_attention: str = "pack",
    fallback: Coefficients | None = None,
    min_points: int = 3,
) -> Coefficients:
    """Fit each op kind's overhead, linear and quadratic terms to a runtime profile (least squares).

    ``profile`` is a ``bigmac-profile/1`` object (``{"format", "pp", "vpp", "microbatches",
    "events": [{"rank", "op", "start", "end"}, ...]}``); ``microbatches[j]`` holds the samples of
    microbatch ``j`` of the profiled step. An LLM microbatch's duration is the sum of its forward
    (or backward) over every chunk on every rank. ``geometry`` and ``llm_attention`` must be the
    profiled model's (see :class:`SampleCostModel`): they decide the spans. Terms are in the profile's
    time unit. A kind
    with fewer than ``min_points`` microbatches that have work for it (e.g. the generator in a
    profile without generated images) takes ``fallback``'s term, which must be in the same unit;
    by default the default coefficients rescaled by the fitted LLM forward.
    """
    # the planner's own op grammar; imported here because importing lightning_bigmac loads torch
    from lightning_bigmac.schedule.costs import PROFILE_FORMAT
    from lightning_bigmac.schedule.plan import Op

    if profile.get("format") != PROFILE_FORMAT:
        raise ValueError(f"not a {PROFILE_FORMAT} profile (format={profile.get('format')!r})")
    declared = profile.get("microbatches", len(microbatches))
    if declared != len(microbatches):
        raise ValueError(
            f"the profile has microbatches={declared} but {len(microbatches)} microbatch descriptors were "
            "given: pass the samples of every microbatch of the profiled step, in order"
        )
    model = SampleCostModel(geometry=geometry or Geometry(), llm_attention=llm_attention)
    durations: dict[str, dict[int, float]] = {f.name: {} for f in fields(Coefficients)}
    for ev in profile["events"]:
        op = Op.parse(str(ev["op"]))
        name, mb = _OP_FIELD[op.kind], op.microbatch
        if not 0 <= mb < len(microbatches):
            raise ValueError(
                f"profile op {ev['op']!r} names microbatch {mb}, outside 0..{len(microbatches) - 1}"
            )
        durations[name][mb] = durations[name].get(mb, 0.0) + float(ev["end"]) - float(ev["start"])
    units = [model.units(mb) for mb in microbatches]
    terms: dict[str, Term] = {}
    for name, seen in durations.items():
        rows = [j for j in sorted(seen) if units[j][_MODULE[name]]]
        if len(rows) < min_points:
            continue
        spans = [np.asarray(units[j][_MODULE[name]], dtype=float) for j in rows]
        features = np.array([[1.0, n.sum(), (n * n).sum()] for n in spans])
        overhead, linear, quadratic = _nonnegative_lstsq(features, np.array([seen[j] for j in rows]))
        terms[name] = Term(linear=float(linear), quadratic=float(quadratic), overhead=float(overhead))
    names = [f.name for f in fields(Coefficients)]
    if fallback is None and set(names) - set(terms):
        if "llm_forward" not in terms:
            raise ValueError(
                f"the profile has {len(durations['llm_forward'])} microbatches with LLM forwards; "
                f"fitting needs at least min_points={min_points} to set its time unit"
            )
        fallback = _defaults_scaled(terms["llm_forward"].linear / Coefficients().llm_forward.linear)
    return Coefficients(**{name: terms.get(name) or getattr(fallback, name) for name in names})


def _defaults_scaled(scale: float) -> Coefficients:
    """The default coefficients in another time unit (``scale`` profile units per LLM token forward)."""
    default = Coefficients()
    return Coefficients(
        **{
            f.name: Term(
                linear=getattr(default, f.name).linear * scale,
                quadratic=getattr(default, f.name).quadratic * scale,
            )
            for f in fields(Coefficients)
        }
    )
