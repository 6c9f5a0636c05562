"""The plan as data: op strings, tables and the JSON exchange format."""

import json

import pytest

from lightning_bigmac.schedule import Op, Plan, PlanFormatError, build_plan


@pytest.mark.parametrize("text", ["F0.0", "B3.17", "EF.5", "EB.12", "G.63"])
def test_op_string_round_trips(text):
    assert str(Op.parse(text)) == text


def test_op_fields_and_module():
    op = Op.parse("B1.12")
    assert (op.kind, op.chunk, op.microbatch, op.module) == ("B", 1, 12, "llm")
    assert Op.parse("EF.3").module == "encoder" and Op.parse("G.3").module == "generator"


@pytest.mark.parametrize("bad", ["F.3", "X1.2", "EF3", "G.-1", "F0.1.2", ""])
def test_bad_op_strings_are_rejected_with_the_expected_form(bad):
    with pytest.raises(PlanFormatError, match=r"expected F<chunk>\.<mb>"):
        Op.parse(bad)


def test_json_round_trip_keeps_everything():
    plan = build_plan("bigmac", pp=2, vpp=2, microbatches=4)
    again = Plan.from_json(plan.to_json(simulation={"step_time": 1.0}))
    assert again == plan
    data = json.loads(plan.to_json())
    assert data["ranks"][0][0] == "EF.0" and data["pp"] == 2 and data["knobs"] == plan.knobs


def test_json_infers_modules_from_ops_when_flags_are_absent():
    data = {"schedule": "x", "pp": 1, "vpp": 1, "microbatches": 1, "ranks": [["F0.0", "B0.0"]]}
    plan = Plan.from_dict(data)
    assert not plan.encoder and not plan.generator


def test_json_errors_name_the_problem(tmp_path):
    with pytest.raises(PlanFormatError, match="lacks key"):
        Plan.from_dict({"pp": 1})
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(PlanFormatError, match="not JSON"):
        Plan.load(path)
    with pytest.raises(PlanFormatError, match="2 rank lists but pp=1"):
        Plan("x", 1, 1, 1, (("F0.0",), ("F0.0",)))


def test_table_reads_like_the_paper_transcript():
    plan = build_plan("megatron", pp=2, microbatches=2)
    assert plan.table().splitlines() == [
        "PP0: [EF.0] F0.0   [EF.1] F0.1   B0.0   [EB.0] B0.1   [EB.1]",
        "PP1: F0.0   [G.0]  B0.0   F0.1   [G.1]  B0.1",
    ]
    long = build_plan("gpipe", pp=2, microbatches=40)
    assert "..." in long.table(max_ops=10) and len(long.table(max_ops=10).splitlines()[0].split()) == 12


def test_derived_views():
    plan = build_plan("bigmac", pp=4, vpp=2, microbatches=64, encoder_warmup=3, llm_warmup="group")
    assert plan.owners("encoder") == [j % 4 for j in range(64)]
    assert plan.owners("generator") == [j % 4 for j in range(64)]
    assert plan.warmup_forwards() == [15, 13, 11, 9]
    assert plan.num_ops() == 4 * 64 * 2 * 2 + 64 * 3
