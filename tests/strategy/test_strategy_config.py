"""BigMacStrategy in one process: registration, the model contract, and bad configurations that
must fail before training with a message naming the setting and the fix."""

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_bigmac
from lightning_bigmac import BigMacStrategy, Microbatches, PipelineParts, check_contract, step_loss
from lightning_bigmac.batches import split_batch
from lightning_bigmac.schedule import OpCosts
from lightning_bigmac.testing.reliability import record
from lightning_bigmac.testing.tiny_module import TinyDataModule, TinyMLLMModule, TinySteps


def _trainer(strategy, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    return pl.Trainer(strategy=strategy, **{**defaults, **kwargs})


def test_strategy_names_are_registered_on_import():
    for name in ("bigmac", "bigmac_spawn", "bigmac_fork", "bigmac_notebook"):
        assert name in StrategyRegistry
    trainer = _trainer("bigmac", devices=2)
    assert isinstance(trainer.strategy, BigMacStrategy)
    assert trainer.strategy.pipeline_parallel_size == 2 and trainer.strategy.schedule.schedule == "bigmac"
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}
    assert lightning_bigmac.__all__  # the public names import


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "zigzag"}, "unknown schedule 'zigzag'"),
        ({"microbatches": 3}, "microbatches=3 is not a multiple of pp=2"),
        ({"encoder_warmup": 1, "microbatches": 16, "virtual_chunks": 2}, "smallest safe value is 3"),
        ({"start_method": "thread"}, "start_method='thread'"),
        ({"timeout": 0}, "timeout=0 must be > 0"),
        ({"virtual_chunks": 0}, "vpp must be >= 1"),
        ({"held_columns": 3}, "held_columns applies to the 'bigmac_zb' schedule, not 'bigmac'"),
        ({"schedule": "bigmac_zb", "weight_deferral": -1}, "weight_deferral"),
    ],
)
def test_bad_strategy_arguments_fail_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BigMacStrategy(**kwargs)


def test_zero_bubble_caps_reach_the_schedule():
    strategy = BigMacStrategy(schedule="bigmac_zb", held_columns=3, weight_deferral=2)
    assert (strategy.schedule.held_columns, strategy.schedule.weight_deferral) == (3, 2)


def test_costs_from_a_file_plan_with_their_means(tmp_path):
    assert BigMacStrategy().costs is None and BigMacStrategy(costs="profile").costs is None  # until step 1
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(OpCosts(llm_forward=(1.0, 3.0), latency=0.25).to_dict()))
    costs = BigMacStrategy(costs=str(path)).costs
    assert costs.llm_forward == 2.0 and costs.latency == 0.25
    with pytest.raises(ValueError, match="costs='profle': give None, 'profile' or the path"):
        BigMacStrategy(costs="profle")


def test_world_size_not_divisible_by_the_pipeline_fails_before_launch():
    with pytest.raises(
        MisconfigurationException, match="world size divisible by 2, but devices x num_nodes = 3"
    ):
        _trainer(BigMacStrategy(pipeline_parallel_size=2), devices=3)


def test_world_size_message_keeps_num_nodes():
    # 1 device x 2 nodes = 2 ranks: 2 devices per node make whole pipelines of 4, not "devices=4"
    with pytest.raises(MisconfigurationException, match=r"= 2 \(1 per node x 2\): use devices=2 per node"):
        _trainer(BigMacStrategy(pipeline_parallel_size=4), devices=1, num_nodes=2)


def test_fp16_with_loss_scaling_is_refused_with_the_alternative():
    # On CPU Lightning turns "16-mixed" into bf16; the GPU plugin (fp16 with a GradScaler) is built here.
    fp16 = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = _trainer(BigMacStrategy(pipeline_parallel_size=1, microbatches=2), plugins=[fp16])
    with pytest.raises(MisconfigurationException, match=r"needs loss scaling .* Use precision='bf16-mixed'"):
        trainer.fit(TinyMLLMModule(), TinyDataModule(steps=2, microbatches=2))
    record(
        "precision='16-mixed' on GPUs (fp16 with a loss scaler)",
        "refused at setup, before any step, naming bf16-mixed as the alternative",
        section="Bad configurations",
    )


def test_unsupported_trainer_options_fail_in_setup():
    trainer = _trainer(BigMacStrategy(pipeline_parallel_size=1, microbatches=2), accumulate_grad_batches=2)
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=2 is not supported"):
        trainer.fit(TinyMLLMModule(), TinyDataModule(steps=2, microbatches=2))


def test_too_few_blocks_for_the_stages():
    trainer = _trainer(
        BigMacStrategy(pipeline_parallel_size=1, virtual_chunks=8, schedule="gpipe", microbatches=2)
    )
    with pytest.raises(ValueError, match=r"4 LLM blocks but .* = 8 stages"):
        trainer.fit(TinyMLLMModule(layers=4), TinyDataModule(steps=2, microbatches=2))


class _NoContract(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


def test_module_without_the_contract_says_what_is_missing():
    with pytest.raises(TypeError, match=r"define `def pipeline_parts\(self\)"):
        check_contract(_NoContract())

    class _Wrong(_NoContract):
        def pipeline_parts(self):
            return {"blocks": []}

    with pytest.raises(TypeError, match=r"returned dict, expected lightning_bigmac\.PipelineParts"):
        check_contract(_Wrong())


class _ForgetsStepLoss(TinyMLLMModule):
    def training_step(self, batch, batch_idx):
        return torch.zeros((), requires_grad=True)


def test_training_step_that_bypasses_the_pipeline_is_an_error():
    trainer = _trainer(BigMacStrategy(pipeline_parallel_size=1, microbatches=2))
    with pytest.raises(MisconfigurationException, match=r"did not call lightning_bigmac\.step_loss"):
        trainer.fit(_ForgetsStepLoss(), TinyDataModule(steps=2, microbatches=2))


def test_same_module_trains_with_the_auto_strategy():
    module = TinyMLLMModule()
    _trainer("auto", max_steps=3).fit(module, TinyDataModule(steps=3, microbatches=4))
    assert len(module.losses) == 3 and all(torch.isfinite(torch.tensor(module.losses)))


def test_step_loss_is_the_reference_loss_without_the_strategy():
    module = TinyMLLMModule()
    step = TinySteps(1, 4)[0]
    assert torch.allclose(step_loss(module, step), module.model.reference_loss(step.microbatches))


def test_split_batch_cuts_tensor_batches_and_keeps_pre_split_ones():
    batch = {"x": torch.arange(10).reshape(10, 1), "y": torch.arange(10)}
    pieces, owners = split_batch(batch, 4)
    assert owners is None and [len(p["y"]) for p in pieces] == [2, 3, 2, 3]
    assert torch.equal(torch.cat([p["x"] for p in pieces]), batch["x"])
    mbs, owners = split_batch(Microbatches([1, 2], owners=[1, 0]), 8)
    assert mbs == [1, 2] and owners == [1, 0]
    with pytest.raises(ValueError, match="a batch of 3 samples cannot make microbatches=4"):
        split_batch({"x": torch.zeros(3)}, 4)
    with pytest.raises(ValueError, match="differ in dim 0"):
        split_batch({"x": torch.zeros(4), "y": torch.zeros(5)}, 2)


def test_pipeline_parts_reject_shared_parameters():
    embed = torch.nn.Embedding(4, 4)
    block = torch.nn.Linear(4, 4)
    block.weight = embed.weight  # only the embedding and the head may share (tied embeddings)
    with pytest.raises(ValueError, match="must not share parameters"):
        PipelineParts(embedding=embed, blocks=[block], head=torch.nn.Linear(4, 4), text_targets=len)


class _Rotary(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.arange(4.0))


class _Block(torch.nn.Module):
    def __init__(self, rotary: torch.nn.Module):
        super().__init__()
        self.rotary = rotary
        self.proj = torch.nn.Linear(4, 4)


def test_pipeline_parts_reject_shared_buffers_naming_the_module_and_the_fix():
    # one rotary module for every block, as Hugging Face decoders have: a rank that frees the blocks
    # it does not own would free the shared buffer of the blocks it keeps
    rotary = _Rotary()
    blocks = [_Block(rotary), _Block(rotary)]
    with pytest.raises(ValueError, match=r"blocks.1.rotary .*is also blocks.0.rotary.*inv_freq.*own copy"):
        PipelineParts(
            embedding=torch.nn.Embedding(4, 4), blocks=blocks, head=torch.nn.Linear(4, 4), text_targets=len
        )
    record(
        "one module with a buffer shared by every block (a rotary embedding)",
        "refused when the contract is read, naming both module paths, the buffer and the fix",
        section="Bad configurations",
    )
