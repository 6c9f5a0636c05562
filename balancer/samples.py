"""What the balancer knows about a sample: its key and the shapes that decide its cost.

A descriptor is cheap metadata (token counts, image and video shapes), never pixels: the
balancer plans a whole buffer of samples before any of them is decoded on a device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Sample"]


def _shape(value: object, size: int, what: str, key: str) -> tuple[int, ...]:
    shape = tuple(int(x) for x in value)  # type: ignore[union-attr]
    if len(shape) != size or min(shape) < 1:
        raise ValueError(f"sample {key!r}: {what} {value!r} must be {size} positive ints")
    return shape


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One training sample as the balancer sees it."""

    key: str
    """Unique within an epoch; named in errors and checked for loss/duplication in tests."""
    text_tokens: int = 0
    """Text tokens the LLM reads (prompt and answer; include any tokens the LLM emits for the generator)."""
    images: tuple[tuple[int, int], ...] = ()
    """Input images as ``(height, width)`` in pixels, after any resizing the model applies."""
    videos: tuple[tuple[int, int, int], ...] = ()
    """Input videos as ``(frames, height, width)``."""
    outputs: tuple[tuple[int, int], ...] = ()
    """Images the generator produces, as ``(height, width)`` in pixels."""

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise TypeError(f"Sample.key must be a non-empty str, got {self.key!r}")
        if int(self.text_tokens) < 0:
            raise ValueError(f"sample {self.key!r}: text_tokens={self.text_tokens} must be >= 0")
        object.__setattr__(self, "text_tokens", int(self.text_tokens))
        for name, size in (("images", 2), ("videos", 3), ("outputs", 2)):
            shapes = tuple(_shape(s, size, name[:-1], self.key) for s in getattr(self, name))
            object.__setattr__(self, name, shapes)

    def with_text_tokens(self, text_tokens: int) -> Sample:
        """A copy with fewer text tokens: how an over-long sample is truncated."""
        return replace(self, text_tokens=text_tokens)
