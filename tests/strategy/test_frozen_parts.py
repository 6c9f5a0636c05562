"""Frozen parts under the strategy: the planner reads them from ``requires_grad`` at every step, the
executor runs a frozen encoder without keeping anything, and training with frozen parts matches
``strategy="auto"``.

The slow tests train the tiny MLLM through phases (nothing frozen, a frozen encoder, a frozen LLM
under a trainable encoder, a frozen generator, only the generator training: ``run_frozen.py``) in
one process under ``auto`` and on 2 processes under ``bigmac`` and ``bigmac_zb``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_bigmac.planning import Planner
from lightning_bigmac.runtime.memory import ActivationMeter
from lightning_bigmac.runtime.plan_fit import check_plan, frozen_parts
from lightning_bigmac.schedule import Op, ScheduleConfig, build_plan
from lightning_bigmac.testing.tiny_mllm import TinyConfig, TinyMLLM, make_microbatches
from tests.schedule.test_frozen import dropped_kinds
from tests.strategy.test_strategy_training import assert_close_losses, run_tiny

FROZEN = [[], ["encoder"], ["llm"], ["generator"], ["encoder", "llm"]]
"""The frozen parts of run_frozen.PHASES (the third freezes the encoder's blocks, not its projection)."""


def test_planner_reads_the_frozen_parts_at_every_step_and_caches_a_plan_per_set():
    model = TinyMLLM(TinyConfig())
    parts = model.parts()
    planner = Planner(ScheduleConfig(schedule="bigmac", pp=2, microbatches=4))
    planner.use_parts(parts)
    full = planner.plan_for(4)
    assert full.frozen == frozenset() and any(op.kind == "EB" for ops in full.ranks for op in ops)
    model.encoder.requires_grad_(False)
    frozen = planner.plan_for(4)
    assert frozen.frozen == {"encoder"} and not any(op.kind == "EB" for ops in frozen.ranks for op in ops)
    model.encoder.requires_grad_(True)
    assert planner.plan_for(4) is full


def test_frozen_parts_count_the_llm_as_embedding_blocks_and_head():
    model = TinyMLLM(TinyConfig())
    parts = model.parts()
    for block in model.blocks:
        block.requires_grad_(False)
    assert frozen_parts(parts) == frozenset()  # the embedding and the head still train
    model.embedding.requires_grad_(False)
    model.head.requires_grad_(False)
    model.generator.requires_grad_(False)
    assert frozen_parts(parts) == {"llm", "generator"}


def test_executor_refuses_a_plan_that_freezes_a_part_with_trainable_parameters():
    parts = TinyMLLM(TinyConfig()).parts()
    plan = build_plan("bigmac", pp=1, microbatches=2, frozen={"encoder"})
    with pytest.raises(ValueError, match=r"the plan says encoder is frozen but it has trainable parameters"):
        check_plan(plan, 2, parts, [], (1, 1))
    parts.encoder.requires_grad_(False)
    check_plan(plan, 2, parts, [], (1, 1))


def test_meter_counts_what_a_frozen_encoders_forward_saves_for_the_op_only():
    model = TinyMLLM(TinyConfig())
    model.encoder.requires_grad_(False)
    mb = make_microbatches(model.cfg, 1, images=(2, 2), seed=1)[0]
    mb["images"].requires_grad_(True)  # a recording forward saves activations (plain inputs: none either way)
    kinds = build_plan("bigmac", pp=1, microbatches=1, frozen={"encoder"}).kinds
    meter = ActivationMeter(model.parameters())
    for grad in (True, False):  # recording: the peak shows it, and nothing stays live after the op
        meter.reset()
        with meter.record(Op("EF", 0), kinds), torch.set_grad_enabled(grad):
            model.encoder(mb)
        assert (meter.report()["encoder"] > 0) == grad and meter.live["encoder"] == 0


def run_frozen(tmp_path: Path, name: str, *args: str) -> dict:
    return run_tiny(tmp_path, name, *args, script="run_frozen.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return run_frozen(tmp_path_factory.mktemp("auto"), "auto", "--strategy", "auto", "--devices", "1")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["bigmac", "bigmac_zb"])
def test_training_with_frozen_parts_matches_one_process_and_keeps_no_frozen_encoder_memory(
    tmp_path, reference, schedule
):
    got = run_frozen(tmp_path, schedule, "--schedule", schedule, "--devices", "2")
    assert_close_losses(got["losses"], reference["losses"])
    assert [p["frozen"] for p in got["profiles"]] == FROZEN  # read from requires_grad at each step
    everything = set(got["profiles"][0]["kinds"])
    for profile in got["profiles"]:
        frozen = set(profile["frozen"])
        assert set(profile["kinds"]) == everything - dropped_kinds(frozen, split=schedule == "bigmac_zb")
        for rank, peaks in enumerate(profile["peaks"]):  # measured bytes saved for backward
            assert (peaks["encoder"] == 0) == ("encoder" in frozen), (frozen, rank, peaks)
            assert (peaks["llm"] == 0) == ({"encoder", "llm"} <= frozen), (frozen, rank, peaks)
            assert peaks["generator"] > 0
