"""The balancer's configuration, checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from .cost import SampleCostModel

__all__ = ["OVERSIZE_POLICIES", "BalancerConfig"]

OVERSIZE_POLICIES = ("error", "skip", "truncate")


@dataclass(frozen=True, kw_only=True)
class BalancerConfig:
    """How samples become steps of microbatches. Sizes are per data-parallel replica."""

    pipeline_size: int
    """P, the pipeline ranks of one replica: microbatches come in groups of P, one per rank."""
    microbatches: int
    """M, microbatches per optimizer step per replica; a multiple of ``pipeline_size``."""
    token_cap: int
    """Most LLM tokens (text plus merged image and video tokens) one microbatch may hold."""
    fill: float = 0.9
    """Share of ``microbatches * token_cap`` tokens a step takes from the buffer. Below 1 leaves
    the packer room to balance; samples it still cannot place wait for the next step."""
    lookahead: float = 1.0
    """Steps' worth of tokens read ahead of the step being packed. The end of a finite source is
    seen this far ahead, so the last steps of an epoch are planned together; it also bounds the
    buffer (about ``(1 + lookahead) * fill * microbatches * token_cap`` tokens)."""
    oversize: str = "error"
    """A sample over ``token_cap``: ``"error"`` raises naming its key; ``"skip"`` drops it;
    ``"truncate"`` shortens its text to fit (skipping it if its images alone are too long).
    Skips and truncations are counted in the adapter's state."""
    llm_tolerance: float = 0.02
    """While balancing encoder columns, a microbatch's additive LLM cost (the sum of its samples'
    ``SampleCost.llm``) may rise to this fraction above the mean (or to the largest LPT load, if
    that is higher). With attention over the pack that is its token count, and the attention term
    makes its cost rise faster: about 1.3 times as fast at 7K tokens with the default coefficients."""
    cost_model: SampleCostModel = field(default_factory=SampleCostModel)
    """Sample descriptor -> cost; fit its coefficients from a runtime profile for real runs."""

    def __post_init__(self) -> None:
        for name in ("pipeline_size", "microbatches", "token_cap"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"BalancerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.microbatches % self.pipeline_size:
            lo = max(self.pipeline_size, self.microbatches // self.pipeline_size * self.pipeline_size)
            raise ValueError(
                f"BalancerConfig.microbatches={self.microbatches} is not a multiple of "
                f"pipeline_size={self.pipeline_size}: microbatches run in groups of one per pipeline rank; "
                f"use {lo} or {lo + self.pipeline_size}"
            )
        if not 0.0 < self.fill <= 1.0:
            raise ValueError(f"BalancerConfig.fill={self.fill} must be in (0, 1]")
        if self.lookahead < 0:
            raise ValueError(f"BalancerConfig.lookahead={self.lookahead} must be >= 0")
        if self.oversize not in OVERSIZE_POLICIES:
            raise ValueError(
                f"BalancerConfig.oversize={self.oversize!r}: use one of {', '.join(OVERSIZE_POLICIES)}"
            )
        if self.llm_tolerance < 0:
            raise ValueError(f"BalancerConfig.llm_tolerance={self.llm_tolerance} must be >= 0")

    @property
    def step_tokens(self) -> float:
        """Tokens one replica's step aims to hold."""
        return self.fill * self.microbatches * self.token_cap
