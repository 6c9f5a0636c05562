"""The example MLLM: shapes, packing without cross-talk, and training through Lightning from every source."""

from __future__ import annotations

from dataclasses import replace

import lightning.pytorch as pl
import pytest
import torch

from examples.mllm import DataConfig, ExampleDataModule, ExampleMLLM, ModelConfig
from examples.mllm.collate import collate
from examples.mllm.model import segment_attention
from examples.mllm.sources import Record, records
from examples.mllm.tokens import GEN
from lightning_bigmac import check_contract
from lightning_bigmac.runtime.parts import run_blocks


def _mixed() -> list[Record]:
    """One sample of every shapes task and of every photo task: images, pairs, videos, text, drawing."""
    out: dict[str, Record] = {}
    for source in ("shapes", "photos"):
        for r in records(source, 0, "train", 200):
            out.setdefault(f"{source}/{r.meta['kind']}", r)
    assert len(out) == 13
    return list(out.values())


def test_shapes_through_every_part(tiny_model: ModelConfig) -> None:
    torch.manual_seed(0)
    model = ExampleMLLM(tiny_model)
    parts = check_contract(model)
    samples = _mixed()
    mb = collate(samples, tiny_model)
    n_patches, n_tokens = len(mb["patches"]), len(mb["tokens"])
    enc = parts.encoder(mb)
    assert enc["features"].shape == (n_patches, tiny_model.encoder_dim)
    hidden = run_blocks(parts.blocks, parts.embedding(mb, enc), mb, parts.context)
    assert hidden.shape == (n_tokens, tiny_model.dim)
    answers = [r.meta["answer"].split() for r in samples if r.meta["answer"]]
    assert parts.text_targets(mb) == sum(len(a) + 1 for a in answers)  # the answer words and <eos>
    assert parts.generator_targets(mb) == int((mb["tokens"] == GEN).sum()) * tiny_model.patch_dim
    assert parts.head(hidden, mb).ndim == 0 and parts.generator(hidden, mb).ndim == 0
    image = model.generate_image("draw a red circle", size=16, steps=2)
    assert image.shape == (16, 16, 3) and image.dtype.name == "uint8"


def test_attention_stays_within_segments() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 7, 2, 4).unbind(0)
    segments = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    out = segment_attention(q, k, v, segments, causal=True)
    for s in range(3):
        at = segments == s
        alone = torch.nn.functional.scaled_dot_product_attention(
            *(x[at].transpose(0, 1) for x in (q, k, v)), is_causal=True
        ).transpose(0, 1)
        torch.testing.assert_close(out[at], alone)


def test_pack_loss_is_the_sum_of_its_samples_alone(tiny_model: ModelConfig) -> None:
    """Block-diagonal attention and per-sample positions: packing changes no sample's loss (float64)."""
    torch.manual_seed(0)
    parts = ExampleMLLM(tiny_model).double().pipeline_parts()
    samples = _mixed()

    def losses(group: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        mb = {
            k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in collate(group, tiny_model, seed=3).items()
        }
        hidden = run_blocks(parts.blocks, parts.embedding(mb, parts.encoder(mb)), mb, parts.context)
        return parts.head(hidden, mb), parts.generator(hidden, mb)

    text, gen = losses(samples)
    alone = [losses([s]) for s in samples]
    torch.testing.assert_close(text, sum(t for t, _ in alone), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gen, sum(g for _, g in alone), rtol=1e-10, atol=1e-10)


def _trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        strategy="auto", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("reader", "sources"), [("webdataset", ("shapes",)), ("hf", ("shapes",)), ("webdataset", ("photos",))]
)
def test_one_training_step_from_each_source(
    tiny_data: DataConfig, tiny_model: ModelConfig, reader: str, sources: tuple[str, ...]
) -> None:
    """Acceptance: the webdataset and HF paths, and the real photos, feed the same training step."""
    torch.manual_seed(0)
    model = ExampleMLLM(tiny_model)
    data = ExampleDataModule(replace(tiny_data, reader=reader, sources=sources), tiny_model)
    first = next(iter(data.loader("train")))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _trainer(max_steps=1, limit_val_batches=0).fit(model, data)
    changed = {name.split(".")[0] for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    drawn = any(len(mb["gen_target"]) for mb in first.microbatches)  # no targets: no generator update
    assert changed == {"encoder", "embedding", "blocks", "head"} | ({"generator"} if drawn else set())


def test_trains_and_validates_with_auto(tiny_data: DataConfig, tiny_model: ModelConfig) -> None:
    torch.manual_seed(0)
    model = ExampleMLLM(tiny_model, lr=3e-3, warmup_steps=1)
    losses: list[float] = []

    class Record_(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            losses.append(float(trainer.callback_metrics["train_loss"]))

    data = ExampleDataModule(replace(tiny_data, sources=("shapes",)), tiny_model)
    trainer = _trainer(max_epochs=12, callbacks=[Record_()], check_val_every_n_epoch=12)
    trainer.fit(model, data)
    assert losses[-1] < 0.6 * losses[0], losses
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val_answer_acc"]) <= 1.0
    assert 0.0 < float(metrics["val_chance_acc"]) < 1.0
