"""The validator rejects bad plans with messages that name the ops at fault."""

import pytest

from lightning_bigmac.schedule import Plan, PlanError, build_plan, validate


def _plan(ranks, encoder=False, generator=False, pp=None, vpp=1, m=2):
    return Plan("hand", pp or len(ranks), vpp, m, tuple(tuple(r) for r in ranks), encoder, generator)


def _swap(ops, a, b):
    ops = list(ops)
    i, j = ops.index(a), ops.index(b)
    ops[i], ops[j] = ops[j], ops[i]
    return ops


def test_good_hand_made_plan_passes():
    validate(_plan([["F0.0", "F0.1", "B0.0", "B0.1"], ["F0.0", "B0.0", "F0.1", "B0.1"]]))


def test_cycle_across_two_ranks_names_the_ops_on_it():
    # PP1 runs F0.1 before F0.0, but PP0 only sends F0.1 after it got B0.0 back from PP1.
    plan = _plan([["F0.0", "B0.0", "F0.1", "B0.1"], ["F0.1", "F0.0", "B0.0", "B0.1"]])
    with pytest.raises(PlanError, match="deadlock") as err:
        validate(plan)
    msg = str(err.value)
    for placed in ("F0.1@PP1", "F0.1@PP0", "B0.0@PP0", "B0.0@PP1"):
        assert placed in msg
    assert ">F0.1<" in msg and "PP1: >F0.1<" in msg  # the grid marks the ops at fault
    assert {str(op) for _, op in err.value.ops} == {"F0.1", "F0.0", "B0.0"}


def test_missing_backward_is_named():
    plan = build_plan("1f1b", pp=2, microbatches=4, encoder=False, generator=False)
    ranks = [list(r) for r in plan.ranks]
    ranks[1] = [op for op in ranks[1] if str(op) != "B0.2"]
    with pytest.raises(PlanError, match=r"missing B0\.2 on rank 1"):
        validate(Plan("hand", 2, 1, 4, tuple(map(tuple, ranks)), False, False))


def test_duplicate_op_is_named():
    plan = build_plan("bigmac", pp=2, microbatches=4)
    ranks = [list(r) for r in plan.ranks]
    ranks[0].append(ranks[1][0])  # EF.1 again, on another rank
    with pytest.raises(
        PlanError, match=r"duplicate op EF\.1: on rank 0 step 14 and again on rank 1 step 0"
    ) as err:
        validate(Plan("hand", 2, 1, 4, tuple(map(tuple, ranks)), True, True))
    assert "PP1: >EF.1<" in str(err.value) and ">EF.1<\n" in str(err.value)


def test_generator_column_before_its_forwards_deadlocks():
    plan = build_plan("bigmac", pp=2, microbatches=4)
    ranks = [list(map(str, r)) for r in plan.ranks]
    ranks[0] = ["G.0", *[o for o in ranks[0] if o != "G.0"]]  # before the LLM forward of mb 0
    with pytest.raises(PlanError, match="deadlock") as err:
        validate(Plan("hand", 2, 1, 4, tuple(map(tuple, ranks)), True, True))
    assert "G.0@PP0" in str(err.value) and "F0.0@PP1" in str(err.value)


def test_encoder_forward_and_backward_must_share_a_rank():
    plan = build_plan("bigmac", pp=2, microbatches=4)
    r0, r1 = (list(map(str, r)) for r in plan.ranks)
    r0 = [o for o in r0 if o != "EB.0"]
    r1 = [*r1, "EB.0"]
    with pytest.raises(PlanError, match=r"EB\.0 is on rank 1 but EF\.0 on rank 0"):
        validate(Plan("hand", 2, 1, 4, (tuple(r0), tuple(r1)), True, True))


@pytest.mark.parametrize(
    ("ops", "match"),
    [
        (["F1.0", "B0.0"], r"chunk 1 outside 0\.\.0"),
        (["F0.7", "B0.0"], r"microbatch 7 outside 0\.\.0"),
        (["EF.0", "F0.0", "B0.0", "EB.0"], "encoder=False"),
        (["F0.0", "G.0", "B0.0"], "generator=False"),
    ],
)
def test_out_of_range_and_unexpected_ops(ops, match):
    with pytest.raises(PlanError, match=match):
        validate(_plan([ops], m=1))


def test_text_only_plan_missing_all_encoder_ops_is_incomplete_when_it_claims_an_encoder():
    plan = build_plan("1f1b", pp=2, microbatches=2, encoder=False, generator=False)
    with pytest.raises(PlanError, match=r"missing EF\.0"):
        validate(Plan("hand", 2, 1, 2, plan.ranks, encoder=True, generator=False))
