"""The example data: token accounting, patches at any resolution, and the two readers agreeing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from balancer.webdataset import webdataset_source
from examples.mllm import DataConfig, ExampleDataModule, ModelConfig
from examples.mllm.collate import balancer_config, collate, describe, patchify, unpatchify
from examples.mllm.hf_rows import hf_dataset, record_from_row
from examples.mllm.shards import build_shards, read_raw
from examples.mllm.sources import Record, records
from examples.mllm.tokens import IMG
from lightning_bigmac import Microbatches


def _sizes(r: Record) -> dict:
    return {
        **r.meta,
        "images": [i.shape[:2] for i in r.images],
        "videos": [v.shape[:3] for v in r.videos],
        "outputs": [o.shape[:2] for o in r.outputs],
    }


@pytest.mark.parametrize("source", ["shapes", "photos"])
def test_balancer_counts_the_packed_length(source: str, tiny_model: ModelConfig) -> None:
    """The descriptor's LLM tokens (text + visual, by the balancer's cost model) are the packed length."""
    cost = balancer_config(DataConfig(), tiny_model).cost_model
    kinds = set()
    for record in records(source, 0, "train", 120):
        kinds.add(record.meta["kind"])
        sample = describe(record.key, _sizes(record), tiny_model)
        mb = collate([record], tiny_model)
        assert cost.cost(sample).tokens == len(mb["tokens"])
        assert int((mb["tokens"] == IMG).sum()) * 4 == len(mb["patches"])  # 2 x 2 patches per LLM token
    expected = {"shapes": 9, "photos": 4}[source]
    assert len(kinds) == expected, f"{source} made only {sorted(kinds)}"


def test_patches_at_native_resolution(tiny_model: ModelConfig) -> None:
    """Any size is patchified as is (padded to whole tokens); a token's 2 x 2 patches are consecutive."""
    img = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)  # not a multiple of 16
    patches, rc = patchify(img, tiny_model)
    assert patches.shape == (2 * 3 * 4, 3 * 8 * 8)  # 2 x 3 tokens of 2 x 2 patches
    assert rc[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert rc[4:8].tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    first = img[:8, :8] / 127.5 - 1
    np.testing.assert_allclose(patches[0].reshape(8, 8, 3), first, rtol=1e-6)
    assert (patches[rc[:, 0] == 3] == -1).all()  # rows 24..31 are padding

    square = np.random.default_rng(1).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    meta = {"kind": "draw", "prompt": "draw a red circle", "answer": "", "choices": 0}
    mb = collate([Record("k", meta, outputs=[square])], tiny_model)
    assert mb["gen_target"].shape == (2 * 4, 192) and mb["gen_pos"][-1].tolist() == [1, 3]
    np.testing.assert_array_equal(unpatchify(mb["gen_target"], 16, 32, 8), square)


def test_video_frames_get_their_frame_index(tiny_model: ModelConfig) -> None:
    video = next(r for r in records("shapes", 0, "train", 100) if r.videos)
    frames, h, w = video.videos[0].shape[:3]
    mb = collate([video], tiny_model)
    per_frame = (h // 8) * (w // 8)
    assert mb["patch_pos"][:, 2].tolist() == [t for t in range(frames) for _ in range(per_frame)]
    assert mb["patch_spans"].unique().tolist() == list(range(frames))  # the encoder attends within a frame


def test_webdataset_and_hf_read_the_same_samples(tiny_data: DataConfig, tiny_model: ModelConfig) -> None:
    """Both readers of the shards give back exactly what the sources generated."""
    cfg = replace(tiny_data, train_samples=16, samples_per_shard=5)
    urls = [u for s in ("shapes", "photos") for u in build_shards(cfg, s, "train", tiny_model)]
    assert len(urls) == 8
    generated = {r.key: r for s in ("shapes", "photos") for r in records(s, cfg.seed, "train", 16)}
    streamed = {}
    for raw in webdataset_source(urls, shuffle=False)(0):  # what the balancer's stream reads
        record = read_raw(raw)
        streamed[record.key] = record
    table = hf_dataset(urls, f"{cfg.cache_dir}/hf")
    loaded = {r.key: r for r in map(record_from_row, table)}
    assert streamed.keys() == loaded.keys() == generated.keys()
    for key, want in generated.items():
        for got in (streamed[key], loaded[key]):
            assert got.meta == want.meta
            for name in ("images", "videos", "outputs"):
                a, b = getattr(got, name), getattr(want, name)
                assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), name


@pytest.mark.parametrize("reader", ["webdataset", "hf"])
def test_loaders_give_balanced_steps(tiny_data: DataConfig, tiny_model: ModelConfig, reader: str) -> None:
    data = ExampleDataModule(replace(tiny_data, reader=reader), tiny_model)
    steps = list(data.loader("train"))
    keys = [k for step in steps for mb in step.microbatches for k in mb["keys"]]
    assert sorted(keys) == sorted(f"{s}-train-{i:06d}" for s in ("shapes", "photos") for i in range(24))
    for step in steps:
        assert isinstance(step, Microbatches) and len(step.microbatches) == 2 and step.owners == [0, 0]
        for mb in step.microbatches:
            assert 0 < len(mb["tokens"]) <= tiny_data.token_cap
            assert mb["segments"].diff().ge(0).all() and mb["positions"][0] == 0
            assert isinstance(mb["gen_noise"], torch.Tensor)


def test_both_readers_make_the_same_validation_steps(tiny_data: DataConfig, tiny_model: ModelConfig) -> None:
    """Unshuffled, the stream and the HF table see the samples in the same order: identical steps."""
    steps = {
        reader: list(ExampleDataModule(replace(tiny_data, reader=reader), tiny_model).loader("val"))
        for reader in ("webdataset", "hf")
    }
    assert len(steps["webdataset"]) == len(steps["hf"]) > 0
    for a, b in zip(steps["webdataset"], steps["hf"], strict=True):
        assert a.owners == b.owners
        for x, y in zip(a.microbatches, b.microbatches, strict=True):
            assert x.keys() == y.keys()
            assert all(x[k] == y[k] if k == "keys" else torch.equal(x[k], y[k]) for k in x)
