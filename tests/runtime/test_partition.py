"""Partitioning: balanced contiguous splits, explicit split points, and a rank keeping only its parts."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_bigmac.runtime import balanced_bounds, partition, place
from lightning_bigmac.testing.tiny_mllm import TinyConfig, TinyMLLM


def _brute_force(costs: list[int], stages: int) -> int:
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        best = worst if best is None else min(best, worst)
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=9), st.integers(1, 4))
def test_balanced_bounds_minimise_the_costliest_stage(costs: list[int], stages: int) -> None:
    if stages > len(costs):
        with pytest.raises(ValueError, match="pp \\* vpp"):
            balanced_bounds(costs, stages)
        return
    bounds = balanced_bounds(costs, stages)
    assert bounds[0] == 0 and bounds[-1] == len(costs) and len(bounds) == stages + 1
    assert all(a < b for a, b in itertools.pairwise(bounds))
    assert max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)) == _brute_force(costs, stages)


def test_default_costs_are_parameter_counts_and_split_points_override() -> None:
    parts = TinyMLLM(TinyConfig(layers=6)).parts()
    assert partition(parts, 2, 1).bounds == (0, 3, 6)
    assert partition(parts, 2, 1, costs=[5, 1, 1, 1, 1, 1]).bounds == (0, 1, 6)
    split = partition(parts, 2, 2, split_points=[1, 2, 4])
    assert [list(split.blocks_of(s)) for s in range(4)] == [[0], [1], [2, 3], [4, 5]]
    assert split.stages_of(1) == [1, 3]
    with pytest.raises(ValueError, match="split_points"):
        partition(parts, 2, 1, split_points=[0])
    with pytest.raises(ValueError, match="one cost per block"):
        partition(parts, 2, 1, costs=[1, 2])


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_holds_only_the_parameters_it_owns(rank: int) -> None:
    model = TinyMLLM(TinyConfig(layers=4))
    split = partition(model.parts(), 2, 1)
    stages = place(model.parts(), split, rank)
    assert [s.index for s in stages] == [rank]
    owned = {f"blocks.{i}" for i in split.blocks_of(rank)} | {"encoder", "generator"}
    owned |= {"embedding"} if rank == 0 else {"head"}
    for name, p in model.named_parameters():
        top = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name.split(".")[0]
        assert p.is_meta == (top not in owned), name


def test_meta_initialised_parts_are_materialised_where_owned() -> None:
    with torch.device("meta"):
        model = TinyMLLM(TinyConfig(layers=2))
    place(model.parts(), partition(model.parts(), 2, 1), 1)
    assert not any(p.is_meta for p in model.blocks[1].parameters())
    assert all(p.is_meta for p in model.blocks[0].parameters())
    assert torch.isfinite(model.head.out.weight).all()
