"""What the balancer knows about a sample: its key and the shapes that decide its cost.

A descriptor is cheap metadata (token counts, image and video shapes), never pixels: the
balancer plans a whole buffer of samples before any of them is decoded on a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["CorruptSample", "Sample"]

_DIMS = {
    "images": ("height", "width"),
    "videos": ("frames", "height", "width"),
    "outputs": ("height", "width"),
}
"""The shape of each entry of a size field, dimension by dimension."""


class CorruptSample(ValueError):
    """A sample that cannot be used; raised by a describe function, it has the sample skipped and counted.

    :class:`Sample` raises it for a bad size, so that a describe function that builds its
    descriptor from damaged metadata has the sample skipped like one with an undecodable image.
    """

    def __init__(self, key: str, detail: str):
        super().__init__(f"sample {key!r}: {detail}")
        self.key, self.detail = key, detail


def _count(value: object, least: int) -> int | None:
    """``value`` as an int if it is a finite number >= ``least``, else None.

    Goes through ``float`` because ``int()`` raises for NaN and infinity without naming the
    field, and would let a negative fraction such as -0.5 through (truncated to 0).
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if math.isfinite(number) and number >= least else None


def _shape(key: str, where: str, entry: object, dims: tuple[str, ...]) -> tuple[int, ...]:
    """One entry of a size field (``where`` names it) as positive ints; CorruptSample names what is bad."""
    expected = f"({', '.join(dims)}), each a finite number >= 1"
    try:
        sizes = tuple(entry)  # type: ignore[call-overload]
    except TypeError:
        raise CorruptSample(key, f"{where}={entry!r} must be {expected}") from None
    if len(sizes) != len(dims):
        raise CorruptSample(key, f"{where}={entry!r} must be {expected}")
    shape = tuple(_count(size, 1) for size in sizes)
    for dim, size, got in zip(dims, sizes, shape, strict=True):
        if got is None:
            raise CorruptSample(key, f"{where}={entry!r} has {dim}={size!r}; expected {expected}")
    return shape  # type: ignore[return-value]


def _shapes(key: str, field: str, value: object) -> tuple[tuple[int, ...], ...]:
    """Every entry of the size field ``field`` (``images``, ``videos``, ``outputs``) as positive ints."""
    dims = _DIMS[field]
    try:
        entries = tuple(value)  # type: ignore[call-overload]
    except TypeError:
        raise CorruptSample(key, f"{field}={value!r} must be a sequence of ({', '.join(dims)})") from None
    return tuple(_shape(key, f"{field}[{i}]", entry, dims) for i, entry in enumerate(entries))


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One training sample as the balancer sees it.

    Sizes are checked on construction: a NaN, infinite, negative (or, for shapes, zero) size
    raises :class:`CorruptSample` naming the key, the field and the value, because a bad size
    would otherwise surface much later as a nonsensical cost or an error that names no sample.
    """

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
        text_tokens = _count(self.text_tokens, 0)
        if text_tokens is None:
            raise CorruptSample(self.key, f"text_tokens={self.text_tokens!r} must be a finite number >= 0")
        object.__setattr__(self, "text_tokens", text_tokens)
        for field in _DIMS:
            object.__setattr__(self, field, _shapes(self.key, field, getattr(self, field)))

    def with_text_tokens(self, text_tokens: int) -> Sample:
        """A copy with fewer text tokens: how an over-long sample is truncated."""
        return replace(self, text_tokens=text_tokens)
