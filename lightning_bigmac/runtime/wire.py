"""What a message between pipeline ranks looks like on the wire: its header, and the slots of an answer.

A header is a list of int64 words, in order::

    [length, tag, num_leaves, spec_bytes, inline,  per leaf: dtype code, requires_grad, ndim, *shape,  spec]

``dtype code`` -1 marks a ``None`` leaf; ``spec`` is the pytree structure
(``torch.utils._pytree.treespec_dumps``) as bytes. A header longer than the envelope continues
in a second message. The ``tag`` slot repeats the message's tag so that a receiver reading a
different message than it expects fails loudly on backends that ignore tags (NCCL). When the
header and every leaf fit the envelope (``inline`` 1), the leaves ride in it after the header,
each padded to 8 bytes, and the message is one transfer.

An *answer* (gradients going back for a message this rank sent) has no header: one tensor per
leaf of the request that requires grad, with that leaf's dtype and shape (:func:`answer_slots`).
:mod:`~lightning_bigmac.runtime.transfer` moves the words; this module only says what they mean.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

__all__ = [
    "Meta",
    "Slot",
    "answer_payload",
    "answer_slots",
    "decode_header",
    "encode_header",
    "leaf_words",
    "meta_of",
]

_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
)
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


Meta = tuple[torch.dtype, bool, list[int]] | None
"""What the header says of one leaf: dtype, requires_grad, shape; None for a ``None`` leaf."""
Slot = tuple[torch.dtype, list[int]] | None
"""Where an answer holds a tensor (its dtype and shape); None where it must hold None."""


@functools.lru_cache(maxsize=1024)
def _specleaf_words(spec: pytree.TreeSpec) -> tuple[int, tuple[int, ...]]:
    """``spec`` serialised for a header: its byte length and the bytes as int64 words (cached:
    a step sends the same few structures over and over, and serialising one costs ~50 us)."""
    raw = pytree.treespec_dumps(spec).encode()
    return len(raw), tuple(np.frombuffer(raw + b"\0" * (-len(raw) % 8), dtype=np.int64).tolist())


@functools.lru_cache(maxsize=1024)
def _load_spec(raw: bytes) -> pytree.TreeSpec:
    return pytree.treespec_loads(raw.decode())


def encode_header(tag: int, spec: pytree.TreeSpec, leaves: list[Any]) -> list[int]:
    """The header of a message with ``leaves`` of structure ``spec``; its ``inline`` slot is 0
    (the sender sets it once it knows whether the leaves fit the envelope)."""
    body: list[int] = []
    for leaf in leaves:
        if leaf is None:
            body.append(-1)
            continue
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"only tensors and None can cross a pipeline stage, got a {type(leaf).__name__} leaf; "
                "put Python values into the microbatch instead (every rank receives it)"
            )
        if leaf.dtype not in _CODE:
            raise TypeError(f"dtype {leaf.dtype} cannot cross a pipeline stage; supported: {list(_CODE)}")
        body += [_CODE[leaf.dtype], int(leaf.requires_grad), leaf.dim(), *leaf.shape]
    spec_bytes, words = _specleaf_words(spec)
    header = [0, tag, len(leaves), spec_bytes, 0, *body, *words]
    header[0] = len(header)
    return header


def decode_header(header: list[int]) -> tuple[pytree.TreeSpec, list[Meta]]:
    num_leaves, spec_bytes = header[2], header[3]
    pos, metas = 5, []
    for _ in range(num_leaves):
        code = header[pos]
        if code < 0:
            metas.append(None)
            pos += 1
            continue
        ndim = header[pos + 2]
        metas.append((_DTYPES[code], bool(header[pos + 1]), header[pos + 3 : pos + 3 + ndim]))
        pos += 3 + ndim
    raw = np.asarray(header[pos:], dtype=np.int64).tobytes()[:spec_bytes]
    return _load_spec(raw), metas


def leaf_words(leaf: torch.Tensor) -> int:
    """int64 words ``leaf`` takes in an envelope (its bytes padded to 8)."""
    return -(-leaf.numel() * leaf.element_size() // 8)


def meta_of(leaf: torch.Tensor | None) -> Meta:
    return None if leaf is None else (leaf.dtype, leaf.requires_grad, list(leaf.shape))


def answer_slots(request: list[Meta]) -> list[Slot]:
    """Slots of an answer to a message with leaves ``request``: a gradient per leaf that requires
    grad (autograd gives it that leaf's dtype and shape), None elsewhere."""
    return [(m[0], m[2]) if m is not None and m[1] else None for m in request]


def answer_payload(
    leaves: list[Any], spec: pytree.TreeSpec, slots: list[Slot], device: torch.device, what: str
) -> list[torch.Tensor]:
    """The buffers of an answer, whose receives the peer posted in advance: one per non-empty slot.

    A None leaf in a tensor slot (an input its stage did not use) travels as zeros of the slot's
    size: the posted receive expects it, and a zero gradient adds nothing in backward.
    """
    if spec != pytree.tree_structure([None] * len(slots)):
        raise ValueError(f"{what}: an answer must be a flat list of one entry per leaf of its request")
    bufs = []
    for i, (leaf, slot) in enumerate(zip(leaves, slots, strict=True)):
        if slot is None:
            if leaf is not None:
                raise ValueError(f"{what}: entry {i} answers a leaf that does not require grad, must be None")
            continue
        if leaf is not None and (leaf.dtype, list(leaf.shape)) != slot:
            raise ValueError(
                f"{what}: entry {i} is {leaf.dtype} {list(leaf.shape)}, its request's leaf {slot}"
            )
        if leaf is None and math.prod(slot[1]) > 0:
            bufs.append(torch.zeros(slot[1], dtype=slot[0], device=device))
        elif leaf is not None and leaf.numel() > 0:
            bufs.append(leaf.detach().contiguous())
    return bufs
