"""The balancer's data position in Lightning: a resumed fit trains the uninterrupted run's steps,
epochs move on (also when ``limit_train_batches`` cuts them), ``StepBatch``es train as they come
from a loader, and Lightning's shuffling sampler under ``bigmac`` is warned about.

One process with ``strategy="auto"``, and ``bigmac`` with P=1 where the strategy itself is under
test; ``test_data_position_bigmac.py`` resumes through the strategy's checkpoint on two processes.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from balancer import BalancedBatchSampler, BalancedStream, StepDataset
from lightning_bigmac import BigMacStrategy
from lightning_bigmac.data_state import DataPosition, StepLoader
from lightning_bigmac.sampler_check import MESSAGE
from lightning_bigmac.testing.tiny_module import TinyDataModule, TinyMLLMModule
from tests.strategy.balanced_steps import CONFIG, KEYS, TOKENS, Keys, Steps, rows, samples, tiny_step


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's steps take milliseconds on one thread and far longer on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_dataset_one_worker(dp_rank: int, dp_size: int) -> StepLoader:
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"key": KEYS, "tokens": TOKENS})
    sampler = BalancedBatchSampler(samples(), CONFIG, dp_rank=dp_rank, dp_size=dp_size)
    return StepLoader(sampler, table, collate_fn=tiny_step, num_workers=1)


def webdataset_stream_one_worker(tmp: Path, dp_rank: int, dp_size: int) -> StepLoader:
    wds = pytest.importorskip("webdataset")
    from balancer.webdataset import decode_sample, webdataset_source

    urls = [str(tmp / f"shard-{s}.tar") for s in range(4)]
    for s, url in enumerate(urls):
        with wds.TarWriter(url) as sink:
            for i in range(s, len(KEYS), 4):
                sink.write({"__key__": KEYS[i], "json": {"text_tokens": TOKENS[i]}})
    source = webdataset_source(urls, seed=0)
    stream = BalancedStream(source, CONFIG, describe=decode_sample, dp_rank=dp_rank, dp_size=dp_size)
    return StepLoader(stream, collate_fn=tiny_step, num_workers=1)


def fit(data: Steps, tmp: Path, *, ckpt_path=None, save=None, every=None, **limits) -> list[tuple]:
    """Train the tiny module on ``data``; the steps it trained, in order. ``every``: checkpoint every
    that many steps into ``tmp``; ``save``: write a checkpoint there when the fit ends."""
    keys = Keys()
    callbacks = [DataPosition(), keys]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp, every_n_train_steps=every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=bool(every),
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=callbacks, **limits,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(TinyMLLMModule(), data, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(tmp / save)
    return keys.seen


@pytest.mark.parametrize("source", ["hf_dataset", "webdataset_stream"])
def test_a_fit_resumed_mid_epoch_trains_the_uninterrupted_runs_steps(source, tmp_path):
    make = (
        hf_dataset_one_worker if source == "hf_dataset" else partial(webdataset_stream_one_worker, tmp_path)
    )
    data = Steps(make)
    whole = fit(data, tmp_path, max_epochs=2)
    epochs = [[keys for e, _, keys in whole if e == epoch] for epoch in (0, 1)]
    assert len(epochs[0]) > 3 and epochs[1] and epochs[1] != epochs[0]  # epoch 1 has an order of its own

    assert fit(data, tmp_path, max_steps=4, every=3) == whole[:4]  # stopped after step 3's checkpoint
    rest = fit(data, tmp_path, max_epochs=2, ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert rest == whole[3:]  # nothing replayed, nothing skipped twice


def test_epochs_cut_by_limit_train_batches_move_on(tmp_path):
    data = Steps(rows)
    whole = fit(data, tmp_path, max_epochs=3, limit_train_batches=2)
    assert [(e, s) for e, s, _ in whole] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    fit(data, tmp_path, max_epochs=1, limit_train_batches=2, save="end.ckpt")
    assert (
        fit(data, tmp_path, max_epochs=3, limit_train_batches=2, ckpt_path=tmp_path / "end.ckpt") == whole[2:]
    )


@pytest.mark.parametrize("strategy", ["auto", "bigmac"])
def test_step_batches_train_as_they_come_from_a_plain_loader(strategy):
    one_rank = dataclasses.replace(CONFIG, pipeline_size=1)  # owners fit the one-rank pipeline
    sampler = BalancedBatchSampler(samples(), one_rank)
    loader = DataLoader(StepDataset(KEYS), batch_sampler=sampler, collate_fn=tiny_step)
    keys = Keys()
    trainer = pl.Trainer(
        strategy=BigMacStrategy(pipeline_parallel_size=1) if strategy == "bigmac" else strategy,
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[keys],
    )  # fmt: skip
    module = TinyMLLMModule()
    trainer.fit(module, train_dataloaders=loader)
    assert len(module.losses) == 2 and [s for _, s, _ in keys.seen] == [0, 1]


@pytest.mark.parametrize(("use_distributed_sampler", "warned"), [(True, True), (False, False)])
def test_lightnings_shuffling_sampler_under_bigmac_is_named_with_its_fix(use_distributed_sampler, warned):
    trainer = pl.Trainer(
        strategy=BigMacStrategy(pipeline_parallel_size=1, microbatches=2), accelerator="cpu", devices=1,
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=use_distributed_sampler,
    )  # fmt: skip
    data = TinyDataModule(steps=2, microbatches=2, join_replicas=2)  # a plain loader of whole steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyMLLMModule(), data)
    assert [str(w.message) for w in caught if str(w.message) == MESSAGE] == ([MESSAGE] if warned else [])
    assert "use_distributed_sampler=False" in MESSAGE
