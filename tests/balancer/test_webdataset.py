"""webdataset shards built here: decoding, a corrupt image, a broken shard, replicas over unequal shards."""

import io
import os

import numpy as np
import pytest

wds = pytest.importorskip("webdataset")
Image = pytest.importorskip("PIL.Image")

from balancer import BalancedStream, BalancerConfig, SkippedSampleWarning  # noqa: E402
from balancer.webdataset import decode_sample, webdataset_source  # noqa: E402

CONFIG = BalancerConfig(pipeline_size=2, microbatches=4, token_cap=4096)


def _png(h, w, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _npy(frames, h, w):
    out = io.BytesIO()
    np.save(out, np.zeros((frames, h, w, 3), dtype=np.uint8))
    return out.getvalue()


def _write_shards(root, sizes=(12,) * 4, corrupt=("shard-1.tar", "000005"), broken="shard-2.tar"):
    """Shards of ``sizes`` text, image, two-image and video samples; a corrupt image; a truncated shard."""
    urls, keys = [], []
    for s, size in enumerate(sizes):
        path = os.path.join(root, f"shard-{s}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(size):
                key = f"{i:06d}"
                sample = {"__key__": key, "json": {"text_tokens": 600 + 97 * ((s * 12 + i) % 9)}}
                kind = i % 4
                if kind == 1:
                    sample["png"] = _png(40 + 8 * i, 56, seed=i)
                elif kind == 2:
                    sample["0.png"], sample["1.png"] = _png(32, 32, seed=i), _png(64, 48, seed=i + 1)
                elif kind == 3:
                    sample["video.npy"] = _npy(4 + i, 56, 56)
                if (os.path.basename(path), key) == corrupt:
                    sample["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
                sink.write(sample)
                keys.append(f"shard-{s}.tar/{key}")
        if os.path.basename(path) == broken:
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(int(size * 0.55))
        urls.append(path)
    return urls, keys


def test_decode_reads_sizes_from_the_pixels(tmp_path):
    urls, _ = _write_shards(str(tmp_path), sizes=(4,), corrupt=(), broken=None)
    decoded = [decode_sample(raw) for raw in webdataset_source(urls, shuffle=False)(0)]
    items, samples = zip(*decoded, strict=True)
    assert [s.key for s in samples] == [f"shard-0.tar/{i:06d}" for i in range(4)]
    assert samples[1].images == ((48, 56),)
    assert samples[2].images == ((32, 32), (64, 48))
    assert samples[3].videos == ((7, 56, 56),)
    assert items[2]["images"][1].size == (48, 64)  # PIL reports (width, height)


def test_a_corrupt_image_and_a_broken_shard_are_skipped_and_counted(tmp_path):
    urls, keys = _write_shards(str(tmp_path))
    stream = BalancedStream(webdataset_source(urls, seed=0), CONFIG, describe=decode_sample)
    with pytest.warns(SkippedSampleWarning) as caught:
        steps = list(stream)
    messages = " ".join(str(w.message) for w in caught)
    assert "shard-1.tar/000005" in messages and "cannot decode 'jpg'" in messages
    assert "shard-2.tar" in messages
    counters = steps[-1].state["counters"]
    assert counters == {"corrupt": 1, "broken_shard": 1, "damaged_member": 1}  # the sample cut in two
    seen = [s.key for step in steps for mb in step.samples for s in mb]
    assert len(seen) == len(set(seen))
    intact = {k for k in keys if not k.startswith("shard-2.tar")} - {"shard-1.tar/000005"}
    assert intact <= set(seen)  # every readable sample of the intact shards arrived
    from_broken = set(seen) - intact
    assert from_broken and len(from_broken) < 12  # the broken shard gave what it had before the break
    for step in steps:
        assert len(step.microbatches) == CONFIG.microbatches and all(step.microbatches)


def test_two_replicas_over_unequal_shards_run_equal_steps_and_resume_exactly(tmp_path):
    urls, keys = _write_shards(str(tmp_path), sizes=(30, 5, 9, 2), corrupt=(), broken=None)
    runs = [
        list(
            BalancedStream(
                webdataset_source(urls, seed=5), CONFIG, describe=decode_sample, dp_rank=r, dp_size=2
            )
        )
        for r in (0, 1)
    ]
    assert len(runs[0]) == len(runs[1]) > 1  # a replica with a step more would hang the job
    seen = [s.key for steps in runs for step in steps for mb in step.samples for s in mb]
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(keys)

    full = runs[1]
    resumed = BalancedStream(
        webdataset_source(urls, seed=5), CONFIG, describe=decode_sample, dp_rank=1, dp_size=2
    )
    resumed.load_state_dict(full[0].state)
    rest = list(resumed)
    assert [s.keys for s in rest] == [s.keys for s in full[1:]]
    assert [s.owners for s in rest] == [s.owners for s in full[1:]]


def test_missing_metadata_is_corrupt_and_no_shards_is_an_error(tmp_path):
    path = str(tmp_path / "bare.tar")
    with wds.TarWriter(path) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:06d}", "png": _png(16, 16, seed=i)})
    stream = BalancedStream(webdataset_source([path]), CONFIG, describe=decode_sample)
    with (
        pytest.warns(SkippedSampleWarning, match="no .json metadata"),
        pytest.raises(ValueError, match="corrupt"),
    ):
        list(stream)
    with pytest.raises(ValueError, match="no shard URLs"):
        webdataset_source([])
