"""The partitioners on plain numbers: invariants as properties, plus their documented guarantees."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.partition import (
    assign_rounds,
    exchange_refine,
    light_ends_order,
    lpt,
    neighbour_groups,
    snake_deal,
)

weights = st.lists(st.floats(min_value=0.0, max_value=1e4, allow_nan=False), min_size=0, max_size=60)
FAST = settings(max_examples=60, deadline=None)


def _flat(parts):
    return sorted(i for p in parts for i in p)


@FAST
@given(weights, st.integers(1, 9))
def test_lpt_places_every_item_once_within_the_list_scheduling_bound(w, parts):
    out = lpt(w, parts)
    assert _flat(out.parts) == list(range(len(w))) and out.unplaced == []
    loads = [sum(w[i] for i in p) for p in out.parts]
    if w:
        assert max(loads) <= sum(w) / parts + max(w) + 1e-6  # Graham: last item started at <= mean
    assert out == lpt(w, parts)  # deterministic


@FAST
@given(st.lists(st.integers(1, 100), min_size=1, max_size=60), st.integers(1, 8), st.integers(50, 200))
def test_lpt_with_capacity_never_overfills_and_returns_what_did_not_fit(sizes, parts, capacity):
    out = lpt([float(s) for s in sizes], parts, sizes=sizes, capacity=capacity)
    assert _flat([*out.parts, out.unplaced]) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in p) <= capacity for p in out.parts)
    for i in out.unplaced:  # unplaced only when no part had room at its turn
        assert min(sum(sizes[j] for j in p) for p in out.parts) + sizes[i] > capacity


def test_lpt_argument_errors():
    with pytest.raises(ValueError, match="parts >= 1"):
        lpt([1.0], 0)
    with pytest.raises(ValueError, match="both sizes and capacity"):
        lpt([1.0], 1, sizes=[1])


@FAST
@given(weights, st.integers(1, 5))
def test_neighbour_groups_are_consecutive_in_sorted_order(w, size):
    groups = neighbour_groups(w, size)
    assert _flat(groups) == list(range(len(w)))
    flat = [w[i] for g in groups for i in g]
    assert flat == sorted(w)
    assert all(len(g) == size for g in groups[:-1])


@FAST
@given(
    st.lists(st.tuples(st.floats(0, 100), st.floats(0, 100), st.integers(0, 50)), min_size=4, max_size=30),
    st.integers(2, 4),
    st.floats(0.0, 0.2),
)
def test_exchange_refine_lowers_the_heaviest_part_within_the_bounds(items, n, slack):
    primary = [p for p, _, _ in items]
    secondary = [s for _, s, _ in items]
    sizes = [z for _, _, z in items]
    parts = [list(range(k, len(items), n)) for k in range(n)]
    capacity = max(sum(sizes[i] for i in p) for p in parts) + 10
    bound = max(sum(primary[i] for i in p) for p in parts) * (1 + slack)
    out = exchange_refine(
        parts, primary=primary, secondary=secondary, sizes=sizes, capacity=capacity, primary_bound=bound
    )
    assert _flat(out) == list(range(len(items)))
    assert all(out_part for out_part in out)  # never empties a part
    assert (
        max(sum(secondary[i] for i in p) for p in out)
        <= max(sum(secondary[i] for i in p) for p in parts) + 1e-9
    )
    assert all(sum(primary[i] for i in p) <= bound + 1e-9 for p in out)
    assert all(sum(sizes[i] for i in p) <= capacity for p in out)


def test_exchange_refine_swaps_text_for_images_at_equal_llm_cost():
    # two microbatches of equal LLM cost; all encoder work sits in the first
    primary = [5.0, 5.0, 5.0, 5.0]
    secondary = [4.0, 4.0, 0.0, 0.0]
    out = exchange_refine(
        [[0, 1], [2, 3]], primary=primary, secondary=secondary, sizes=[1] * 4, capacity=2, primary_bound=10.0
    )
    assert sorted(sum(secondary[i] for i in p) for p in out) == [4.0, 4.0]


@FAST
@given(weights, st.integers(1, 6))
def test_snake_deal_gives_equal_counts(w, parts):
    out = snake_deal(w, parts)
    assert _flat(out) == list(range(len(w)))
    assert max(map(len, out)) - min(map(len, out)) <= 1


@FAST
@given(st.lists(st.floats(0, 100), min_size=2, max_size=20, unique=True))
def test_light_ends_order_puts_the_two_lightest_at_the_ends(w):
    perm = light_ends_order(w)
    assert sorted(perm) == list(range(len(w)))
    assert {w[perm[0]], w[perm[-1]]} == set(sorted(w)[:2])
    assert w[perm[0]] == min(w)


@FAST
@given(st.lists(st.lists(st.floats(0, 100), min_size=3, max_size=3), min_size=1, max_size=20))
def test_assign_rounds_gives_a_permutation_per_round_and_evens_totals(rounds):
    owners = assign_rounds(rounds, 3)
    assert all(sorted(o) == [0, 1, 2] for o in owners)
    load = [0.0] * 3
    for weights_, owner in zip(rounds, owners, strict=True):
        for item, worker in enumerate(owner):
            load[worker] += weights_[item]
    assert max(load) - min(load) <= max(max(r) for r in rounds) + 1e-9


def test_assign_rounds_rejects_a_round_of_the_wrong_size():
    with pytest.raises(ValueError, match="3 items but there are 2 workers"):
        assign_rounds([[1.0, 2.0, 3.0]], 2)
