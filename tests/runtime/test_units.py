"""Single-process pieces: transfer headers, the model contract's checks, gradient buckets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from lightning_bigmac.runtime import PipelineParts
from lightning_bigmac.runtime.grad_sync import buckets
from lightning_bigmac.runtime.transfer import HEADER_SLOTS
from lightning_bigmac.runtime.wire import answer_payload, answer_slots, decode_header, encode_header


def test_header_round_trips_structure_shapes_dtypes_and_grad_flags() -> None:
    tree = {
        "features": [torch.zeros(3, 4, requires_grad=True), None],
        "ids": (torch.zeros(0, dtype=torch.int64), torch.ones(2, 1, 5, dtype=torch.bfloat16)),
        "scalar": torch.tensor(1.0),
    }
    leaves, spec = pytree.tree_flatten(tree)
    header = encode_header(77, spec, leaves)
    assert header[0] == len(header) and header[1] == 77
    got_spec, metas = decode_header(header)
    assert got_spec == spec
    for leaf, meta in zip(leaves, metas, strict=True):
        if leaf is None:
            assert meta is None
        else:
            assert meta == (leaf.dtype, leaf.requires_grad, list(leaf.shape))


def test_long_headers_are_allowed_and_bad_leaves_rejected() -> None:
    leaves, spec = pytree.tree_flatten({f"key_{i}": torch.zeros(i % 3 + 1) for i in range(100)})
    assert len(encode_header(1, spec, leaves)) > HEADER_SLOTS  # continues in a second message
    leaves, spec = pytree.tree_flatten([torch.zeros(1), 3])
    with pytest.raises(TypeError, match="only tensors and None"):
        encode_header(1, spec, leaves)


def test_parts_reject_shared_parameters_and_missing_counters() -> None:
    emb, head = nn.Embedding(4, 2), nn.Linear(2, 4)
    head.weight = nn.Parameter(torch.zeros(4, 2))
    tied = nn.Linear(2, 4)
    tied.weight = emb.weight
    with pytest.raises(ValueError, match="must not share parameters"):  # only embedding and head may
        PipelineParts(embedding=emb, blocks=[tied], head=head, text_targets=len)
    with pytest.raises(ValueError, match="generator_targets"):
        PipelineParts(
            embedding=emb, blocks=[nn.Linear(2, 2)], head=head, text_targets=len, generator=nn.Linear(2, 2)
        )
    with pytest.raises(ValueError, match="blocks is empty"):
        PipelineParts(embedding=emb, blocks=[], head=head, text_targets=len)
    with pytest.raises(TypeError, match="blocks\\[0\\]"):
        PipelineParts(embedding=emb, blocks=[lambda h: h], head=head, text_targets=len)


def test_buckets_respect_size_and_dtype() -> None:
    params = [
        nn.Parameter(torch.zeros(n, dtype=dt))
        for n, dt in [
            (10, torch.float32),
            (10, torch.float32),
            (30, torch.float32),
            (5, torch.float64),
            (1, torch.float64),
        ]
    ]
    sizes = [[p.numel() for p in run] for run in buckets(params, bucket_bytes=80)]
    assert sizes == [[10, 10], [30], [5, 1]]


def test_rank_layout_keeps_pipelines_contiguous() -> None:
    from lightning_bigmac.runtime import global_rank, layout

    assert layout(2, 2) == {"pipelines": [[0, 1], [2, 3]], "data_parallel": [[0, 2], [1, 3]]}
    assert [global_rank(p, 1, 4) for p in range(4)] == [4, 5, 6, 7]


def test_answers_follow_their_request_and_stand_in_for_unused_inputs() -> None:
    request = [(torch.float32, True, [3, 4]), None, (torch.int64, False, [2]), (torch.bfloat16, True, [0])]
    slots = answer_slots(request)
    assert slots == [(torch.float32, [3, 4]), None, None, (torch.bfloat16, [0])]
    grad = torch.ones(3, 4)
    leaves, spec = pytree.tree_flatten([grad, None, None, torch.zeros(0, dtype=torch.bfloat16)])
    assert answer_payload(leaves, spec, slots, torch.device("cpu"), "B0.1")[0].equal(grad)
    leaves, spec = pytree.tree_flatten([None, None, None, None])  # an input its stage did not use
    (placeholder,) = answer_payload(leaves, spec, slots, torch.device("cpu"), "B0.1")
    assert placeholder.shape == (3, 4) and not placeholder.any()
    for bad in ([grad.double(), None, None, None], [grad, grad, None, None], (grad, None, None, None)):
        leaves, spec = pytree.tree_flatten(bad)
        with pytest.raises(ValueError, match=r"B0\.1"):
            answer_payload(leaves, spec, slots, torch.device("cpu"), "B0.1")
