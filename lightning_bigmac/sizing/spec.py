"""What a model and a microbatch are made of, in the numbers a memory estimate needs.

A part (encoder, LLM, generator) is a stack of transformer layers plus what sits around them. Its
parameters give the weight, gradient and optimizer bytes; its layer shape and the microbatch's
token counts give the activations autograd saves for backward. Activations are counted in
*elements per token per layer*, the unit a transformer layer's saved tensors come in (a pre-norm
layer with an unfused MLP, attention by a flash kernel that keeps no ``seq x seq`` matrix)::

    attention   2h (norm input, norm output) + q + 2kv (queries, keys, values)
                + q (attention output: the kernel keeps it and the output projection reads it;
                one tensor, as flash kernels lay it out token-major)
    dense MLP   2h (norm input, norm output) + 2f (GELU: its input, the down projection's input)
                or 4f (gated: gate output, its activation, up output, their product)
    MoE MLP     2h + E (router probabilities) + k x (2h + 4f_e, or 2f_e with GELU) per token
                routed to k of E experts (the dispatched copy, the expert output weighed by its router
                probability, the gated MLP inside)

with ``h`` the hidden size, ``q`` / ``kv`` the query and key/value widths (heads x head dim),
``f`` the MLP width. A plain 4h GELU layer gives 16h elements: Korthikanti et al.'s 34h bytes in
16 bits without their two 1-byte dropout masks. Around the layers each part keeps 2h per token for
its final norm and output projection (the LM head's input for the LLM), and the LLM's last stage
keeps the logits (``vocab`` per token at :attr:`Workload.logits_bytes`, what a cross-entropy's
log-softmax saves).
Normalisation statistics, rotary tables and attention's log-sum-exp are a few elements per token
and are not counted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

__all__ = ["PAPER_MODEL", "PAPER_WORKLOAD", "LLMSpec", "ModelSpec", "PartSpec", "Workload", "parse_count"]

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_COUNT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGT]?)\s*$", re.IGNORECASE)


def parse_count(text: str | float) -> int:
    """``"30.5B"``, ``"1.3e9"``, ``"768"`` or a number as an int (K, M, B/G, T: powers of 1000)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _COUNT_RE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a count: write e.g. 768, 1.3e9 or 30.5B (K, M, B, T suffixes)")
    return round(float(m[1]) * _SUFFIX[m[2].upper()])


@dataclass(frozen=True, kw_only=True)
class PartSpec:
    """Sizes of the encoder or the generator (the LLM adds its vocabulary: :class:`LLMSpec`)."""

    params: int
    """Parameters of the whole part (each shared tensor once)."""
    hidden: int
    """Hidden size h of its layers."""
    layers: int
    """Transformer layers."""
    q_dim: int = 0
    """Query width (heads x head dim); 0: ``hidden``."""
    kv_dim: int = 0
    """Key and value width each (key/value heads x head dim); 0: ``q_dim``."""
    ffn: int = 0
    """Width of a dense MLP; 0: ``4 * hidden``. Unused when ``experts > 0``."""
    gated: bool = False
    """Gated MLP (SwiGLU: gate, up, down projections) instead of GELU (up, down)."""
    experts: int = 0
    """MoE: experts per layer (0: a dense MLP)."""
    experts_per_token: int = 0
    """MoE: experts each token is routed to (top-k)."""
    expert_ffn: int = 0
    """MoE: MLP width of one expert."""
    active_params: int = 0
    """Parameters one token passes through (MoE); 0: ``params``. Informational: no byte count
    depends on it."""

    def __post_init__(self) -> None:
        for name in ("q_dim", "kv_dim", "ffn", "active_params"):
            if getattr(self, name) == 0:
                default = {"q_dim": self.hidden, "kv_dim": self.q_dim or self.hidden,
                           "ffn": 4 * self.hidden, "active_params": self.params}[name]  # fmt: skip
                object.__setattr__(self, name, default)

    def layer_elements(self) -> int:
        """Elements one token's pass through one layer saves for backward (module docstring)."""
        h = self.hidden
        attention = 2 * h + 2 * self.q_dim + 2 * self.kv_dim
        inner = 4 if self.gated else 2
        if self.experts:
            mlp = 2 * h + self.experts + self.experts_per_token * (2 * h + inner * self.expert_ffn)
        else:
            mlp = 2 * h + inner * self.ffn
        return attention + mlp

    def check(self, part: str) -> None:
        """Raise ``ValueError`` naming the field of ``part`` that cannot describe a model."""
        for name in ("params", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{part}: {name}={getattr(self, name)} must be >= 1 (e.g. {part} {name}=...)"
                )
        if self.experts and not (1 <= self.experts_per_token <= self.experts and self.expert_ffn >= 1):
            raise ValueError(
                f"{part}: experts={self.experts} needs experts_per_token in 1..{self.experts} and "
                f"expert_ffn >= 1 (got {self.experts_per_token}, {self.expert_ffn})"
            )
        if not 0 < self.active_params <= self.params:
            raise ValueError(f"{part}: active_params={self.active_params} must be in 1..params={self.params}")

    @classmethod
    def from_fields(cls, part: str, values: Mapping[str, Any]) -> PartSpec:
        """A spec from ``key=value`` fields (the CLI's form); unknown keys are an error naming the known."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{part}: unknown field(s) {unknown}; known: {', '.join(known)}")
        missing = [k for k, f in known.items() if f.default is MISSING and k not in values]
        if missing:
            raise ValueError(
                f"{part}: give {', '.join(missing)} (e.g. {part} params=1.3B,hidden=1536,layers=45)"
            )
        typed: dict[str, Any] = {}
        for key, value in values.items():
            if known[key].type == "bool":
                typed[key] = str(value).lower() in ("1", "true", "yes")
                continue
            try:
                typed[key] = parse_count(value)
            except ValueError as err:
                raise ValueError(f"{part}: {key}={value}: {err}") from None
        spec = cls(**typed)
        spec.check(part)
        return spec


@dataclass(frozen=True, kw_only=True)
class LLMSpec(PartSpec):
    """The LLM: its layers are split into ``pp * vpp`` stages; stage 0 also holds the embedding,
    the last stage the head (final norm and LM head)."""

    vocab: int
    """Vocabulary size (logits per token on the last stage)."""
    tied: bool = False
    """The LM head's weight is the embedding's: the runtime keeps a copy on the first and the last
    stage's ranks, counted once in ``params``."""
    embedding_params: int = 0
    """Parameters of the embedding on stage 0; 0: ``vocab * hidden``."""
    head_params: int = 0
    """Parameters of the head on the last stage (the tied weight included); 0: ``vocab * hidden``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("embedding_params", "head_params"):
            if getattr(self, name) == 0:
                object.__setattr__(self, name, self.vocab * self.hidden)

    @property
    def layer_params(self) -> float:
        """Parameters of one layer: what ``params`` leaves after the embedding and the head (whose
        tied weight, ``vocab * hidden``, ``params`` counts once), shared evenly by the layers."""
        tied = self.vocab * self.hidden if self.tied else 0
        return (self.params - self.embedding_params - self.head_params + tied) / self.layers

    def check(self, part: str = "llm") -> None:
        super().check(part)
        if self.vocab < 1:
            raise ValueError(f"{part}: vocab={self.vocab} must be >= 1")
        if self.layer_params <= 0:
            raise ValueError(
                f"{part}: params={self.params} leave nothing for the {self.layers} layers after the "
                f"embedding ({self.embedding_params}) and head ({self.head_params}): check params and vocab"
            )


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The three parts; ``encoder`` or ``generator`` None for a model without one."""

    llm: LLMSpec
    encoder: PartSpec | None = None
    generator: PartSpec | None = None
    encoder_merge: int = 1
    """Encoder tokens per LLM image token (Qwen2-VL's 2x2 patch merger: 4)."""
    name: str = ""
    """What the spec describes, for reports."""

    def parts(self) -> dict[str, PartSpec]:
        """The parts present, by module name (``encoder``, ``llm``, ``generator``)."""
        found = {"encoder": self.encoder, "llm": self.llm, "generator": self.generator}
        return {k: v for k, v in found.items() if v is not None}

    def check(self) -> None:
        for part, spec in self.parts().items():
            spec.check(part)
        if self.encoder_merge < 1:
            raise ValueError(f"encoder_merge={self.encoder_merge} must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One microbatch, as every microbatch of the step (the estimate takes them all equal)."""

    sequence: int
    """LLM positions of the packed sequence."""
    image_tokens: int = 0
    """Of those, positions that take encoder outputs."""
    encoder_tokens: int = -1
    """Tokens through the encoder's layers; -1: ``image_tokens * encoder_merge``."""
    generator_tokens: int = 0
    """Tokens through the generator's layers."""
    activation_bytes: int = 2
    """Bytes per activation element (2 for bf16 / fp16 autocast, 4 for fp32)."""
    logits_bytes: int = 4
    """Bytes per logit the loss keeps (4: an fp32 log-softmax; 0: a fused, chunked cross-entropy)."""

    def resolved(self, model: ModelSpec) -> Workload:
        """This workload with ``encoder_tokens`` derived for ``model``; checked against it."""
        out = self
        if self.encoder_tokens < 0:
            out = replace(self, encoder_tokens=self.image_tokens * model.encoder_merge)
        out.check(model)
        return out

    def check(self, model: ModelSpec) -> None:
        if self.sequence < 1:
            raise ValueError(f"sequence={self.sequence} must be >= 1 (LLM positions per microbatch)")
        if not 0 <= self.image_tokens <= self.sequence:
            raise ValueError(f"image_tokens={self.image_tokens} must be in 0..sequence={self.sequence}")
        if self.activation_bytes not in (1, 2, 4) or self.logits_bytes not in (0, 1, 2, 4):
            raise ValueError(
                f"activation_bytes={self.activation_bytes} must be 1, 2 or 4 and logits_bytes="
                f"{self.logits_bytes} 0, 1, 2 or 4"
            )
        if model.encoder is not None and self.encoder_tokens < 1:
            raise ValueError("the model has an encoder but a microbatch gives it no tokens: set image_tokens")
        if model.generator is not None and self.generator_tokens < 1:
            raise ValueError(
                "the model has a generator but a microbatch gives it no tokens: set generator_tokens"
            )


# The paper's setting (arXiv 2605.25451): Qwen3-30B-A3B, a 1.3B ViT, a 20B MMDiT, 8K sequences.
# The LLM is Qwen3-30B-A3B's published config (hidden 2048, 48 layers, 32 query heads and 4
# key/value heads of 128, 128 experts of width 768, top-8, vocabulary 151936, untied): per layer
# 18,874,368 attention + 4,352 norms + 262,144 router + 603,979,776 experts; its head is the LM
# head and the final norm. The paper gives only the encoder's and the generator's sizes; their
# shapes here are assumptions: a ViT of width 1536, 45 layers, GELU MLP 6144, with Qwen2-VL's 2x2
# patch merger; an MMDiT like Qwen-Image's (width 3072, 60 double-stream layers, MLP 12288), where
# every token passes one stream's layer.
PAPER_MODEL = ModelSpec(
    name="Qwen3-30B-A3B + 1.3B ViT + 20B MMDiT",
    llm=LLMSpec(
        params=30_532_122_624, active_params=3_353_032_704, hidden=2048, layers=48, q_dim=4096,
        kv_dim=512, gated=True, experts=128, experts_per_token=8, expert_ffn=768, vocab=151_936,
        embedding_params=311_164_928, head_params=311_166_976,
    ),
    encoder=PartSpec(params=1_300_000_000, hidden=1536, layers=45, ffn=6144),
    generator=PartSpec(params=20_000_000_000, hidden=3072, layers=60, ffn=12288),
    encoder_merge=4,
)  # fmt: skip
"""The paper's model (sizes and the assumptions behind them in the comment above)."""

PAPER_WORKLOAD = Workload(sequence=8192, image_tokens=4096, generator_tokens=4096)
"""The paper's 8K packed sequences; assumed: half the positions are image tokens (16384 ViT patches
before the 2x2 merge) and each microbatch generates one 1024x1024 image (4096 latent tokens)."""
