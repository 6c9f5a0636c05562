"""`bigmac plan`: the report, the JSON exchange format, pictures, and errors."""

import json

from lightning_bigmac.cli import main
from lightning_bigmac.schedule import Plan, build_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plan_command_reports_and_writes_json_and_pictures(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([
        "plan", "--schedule", "bigmac", "--pp", "4", "--vpp", "2", "--microbatches", "64",
        "--encoder-warmup", "3", "--llm-warmup", "group",
        "--json", str(out / "plan.json"), "--png", str(out / "gantt.png"),
        "--memory-png", str(out / "mem.png"),
    ])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "warm-up forwards per rank: 15 13 11 9   (Megatron: 11 9 7 5)" in text
    assert "efficiency vs ideal" in text and "efficiency vs bound" in text and "megatron / this" in text
    assert "encoder" in text and "generator" in text
    data = json.loads((out / "plan.json").read_text())
    assert {"schedule", "pp", "vpp", "microbatches", "ranks", "simulation"} <= set(data)
    sim = data["simulation"]
    assert {"step_time", "ideal_step_time", "lower_bound", "peak_live"} <= set(sim)
    assert sim["peak_live"] == {"encoder": [3] * 4, "llm": [15, 13, 11, 9], "generator": [1] * 4}
    assert data["ranks"][3][:4] == ["EF.3", "EF.7", "EF.11", "F0.0"]
    for name in ("gantt.png", "mem.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC and (out / name).stat().st_size > 10_000


def test_from_json_validates_and_simulates_a_given_plan(tmp_path, capsys):
    path = tmp_path / "p.json"
    build_plan("interleaved", pp=2, vpp=2, microbatches=4).save(path)
    assert main(["plan", "--from-json", str(path), "--print-plan", "--png", str(tmp_path / "g.svg")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("PP0: [EF.0] F0.0") and "interleaved: pp=2 vpp=2 microbatches=4" in text
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<?xml")


def test_broken_plan_file_fails_with_the_validator_message(tmp_path, capsys):
    plan = build_plan("1f1b", pp=2, microbatches=2, encoder=False, generator=False)
    ranks = [list(map(str, plan.ranks[0])), list(reversed(list(map(str, plan.ranks[1]))))]
    path = tmp_path / "bad.json"
    Plan("hand", 2, 1, 2, tuple(map(tuple, ranks)), False, False).save(path)
    assert main(["plan", "--from-json", str(path)]) == 2
    assert "deadlock" in capsys.readouterr().err


def test_unsafe_knob_is_an_error_naming_the_smallest_safe_value(capsys):
    assert main(["plan", "--pp", "4", "--vpp", "2", "--microbatches", "32", "--encoder-warmup", "2"]) == 2
    assert "smallest safe value is 3" in capsys.readouterr().err


def test_costs_file_changes_the_simulation(tmp_path, capsys):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"encoder_forward": 4.0, "encoder_backward": 8.0, "encoder_bytes": 2**20}))
    assert main(["plan", "--pp", "2", "--microbatches", "8", "--no-generator", "--costs", str(costs)]) == 0
    text = capsys.readouterr().out
    assert "encoder (MiB)" in text
