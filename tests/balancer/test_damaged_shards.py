"""Damaged tar headers in a webdataset shard: resynchronise, skip whole samples, count, warn, close files."""

import gc
import gzip
import io
import os
import tarfile
import warnings

import numpy as np
import pytest

wds = pytest.importorskip("webdataset")

from balancer import BalancedStream, BalancerConfig, Sample, Skipped, SkippedSampleWarning  # noqa: E402
from balancer.webdataset import webdataset_source  # noqa: E402
from lightning_bigmac.testing.reliability import record  # noqa: E402

SAMPLES = 8
DAMAGED = "000003"


def _content(key: str, member: str) -> bytes:
    """Distinct bytes per member, a few blocks long, so that a lost or shifted member shows."""
    return f"{key}.{member} ".encode() * (97 + 31 * int(key))


def _write_shard(path: str, samples: int = SAMPLES) -> dict[str, dict[str, bytes]]:
    """Samples of three members each (``0.png``, ``1.png``, ``json``, in that order in the tar)."""
    written = {}
    with wds.TarWriter(path) as sink:
        for i in range(samples):
            key = f"{i:06d}"
            written[key] = {m: _content(key, m) for m in ("0.png", "1.png", "json")}
            sink.write({"__key__": key, **written[key]})
    return written


def _header_offset(path: str, member: str) -> int:
    """Where the member's own header is (``TarWriter`` puts a pax header with the mtime before it)."""
    with tarfile.open(path) as tar:
        return tar.getmember(member).offset_data - tarfile.BLOCKSIZE


def _garbage(block: bytes) -> bytes:
    return np.random.default_rng(0).integers(0, 256, size=len(block), dtype=np.uint8).tobytes()


def _flip_name_byte(block: bytes) -> bytes:
    flipped = bytearray(block)
    flipped[5] ^= 0x01  # the key's last digit: "000003" reads "000002"
    return bytes(flipped)


def _zeroed(block: bytes) -> bytes:
    return bytes(len(block))


DAMAGES = {"garbage": _garbage, "name_flip": _flip_name_byte, "zeroed": _zeroed}


def _damage(path: str, member: str, how) -> None:
    at = _header_offset(path, member)
    with open(path, "r+b") as f:
        f.seek(at)
        block = f.read(tarfile.BLOCKSIZE)
        f.seek(at)
        f.write(how(block))


def _read(path: str) -> tuple[dict[str, dict], list[Skipped]]:
    samples, skipped = {}, []
    for element in webdataset_source([path], shuffle=False)(0):
        if isinstance(element, Skipped):
            skipped.append(element)
        else:
            samples[element["__key__"]] = {k: v for k, v in element.items() if not k.startswith("__")}
    return samples, skipped


def _read_damaged(tmp_path, member: str, how: str) -> tuple[str, dict, dict, list]:
    """Write a shard, damage ``member``'s header the ``how`` way, read it back."""
    path = str(tmp_path / "shard-0.tar")
    written = _write_shard(path)
    _damage(path, member, DAMAGES[how])
    return (path, written, *_read(path))


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_header_inside_a_sample_loses_that_sample_only(tmp_path, how):
    path, written, samples, skipped = _read_damaged(tmp_path, f"{DAMAGED}.1.png", how)
    assert samples == {k: v for k, v in written.items() if k != DAMAGED}  # the rest intact, after too
    assert [(s.reason, s.key) for s in skipped] == [("damaged_member", f"shard-0.tar/{DAMAGED}")]
    assert path in skipped[0].detail and "2 readable member(s)" in skipped[0].detail
    record(
        f"webdataset shard, tar header inside a sample damaged ({how})",
        "reading resynchronises at the next valid header: that sample is skipped with a warning naming "
        "the shard and counted in the adapter's state; every other sample arrives intact",
        section="Bad data",
    )


@pytest.mark.parametrize("how", DAMAGES)
def test_damage_between_samples_skips_both_neighbours(tmp_path, how):
    # the first member of 000003 is unreadable: it may as well have been the last of 000002
    _, written, samples, skipped = _read_damaged(tmp_path, f"{DAMAGED}.0.png", how)
    assert samples == {k: v for k, v in written.items() if k not in ("000002", DAMAGED)}
    assert [s.key for s in skipped] == ["shard-0.tar/000002", f"shard-0.tar/{DAMAGED}"]
    assert {s.reason for s in skipped} == {"damaged_member"}


def test_damage_with_no_valid_header_after_it_breaks_the_rest_of_the_shard(tmp_path):
    path = str(tmp_path / "shard-0.tar")
    written = _write_shard(path)
    with open(path, "r+b") as f:  # garbage from inside 000005's first member to the end
        f.seek(_header_offset(path, "000005.0.png") + 2 * tarfile.BLOCKSIZE)
        tail = len(f.read())
        f.seek(-tail, os.SEEK_END)
        f.write(_garbage(bytes(tail)))
    samples, skipped = _read(path)
    assert samples == {k: v for k, v in written.items() if k < "000005"}
    assert [(s.reason, s.key) for s in skipped] == [
        ("damaged_member", "shard-0.tar/000005"),
        ("broken_shard", path),
    ]
    assert "no valid tar header" in skipped[1].detail
    record(
        "webdataset shard, garbage to its end",
        "the damaged sample and the rest of the shard are counted as skipped (broken_shard), with a "
        "warning; the samples before the damage arrive intact",
        section="Bad data",
    )


def test_a_healthy_shard_reads_whole_and_ends_cleanly(tmp_path):
    path = str(tmp_path / "shard-0.tar")
    written = _write_shard(path)
    assert _read(path) == (written, [])


def test_damage_is_warned_with_the_shard_and_counted_in_the_resumable_state(tmp_path):
    urls = [str(tmp_path / f"shard-{s}.tar") for s in range(2)]
    for url in urls:
        _write_shard(url)
    _damage(urls[1], f"{DAMAGED}.1.png", _zeroed)

    def describe(raw):
        key = f"{os.path.basename(raw['__url__'])}/{raw['__key__']}"
        return key, Sample(key=key, text_tokens=len(raw["json"]))

    config = BalancerConfig(pipeline_size=2, microbatches=2, token_cap=16384)
    stream = BalancedStream(webdataset_source(urls, shuffle=False), config, describe=describe)
    with pytest.warns(SkippedSampleWarning, match=r"shard-1\.tar/000003.*damaged_member.*shard-1\.tar"):
        steps = list(stream)
    seen = {k for step in steps for mb in step.keys for k in mb}
    assert seen == {f"shard-{s}.tar/{i:06d}" for s in range(2) for i in range(SAMPLES)} - {
        f"shard-1.tar/{DAMAGED}"
    }
    assert steps[-1].state["counters"] == {"damaged_member": 1}
    resumed = BalancedStream(webdataset_source(urls, shuffle=False), config, describe=describe)
    resumed.load_state_dict(steps[0].state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        rest = list(resumed)
    assert [s.keys for s in rest] == [s.keys for s in steps[1:]]
    assert rest[-1].state["counters"] == {"damaged_member": 1}


def test_shard_files_are_closed_when_read_through_or_abandoned(tmp_path):
    path = str(tmp_path / "shard-0.tar")
    _write_shard(path)
    _damage(path, f"{DAMAGED}.1.png", _garbage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        _read(path)
        abandoned = iter(webdataset_source([path], shuffle=False)(0))
        next(abandoned)
        del abandoned
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_names_and_a_lost_long_name_header(tmp_path, fmt):
    # a name over 100 bytes goes in a header of its own; without it the member's name is cut to
    # 100 bytes, here "<90 x>/run.2024-", which reads as key "<90 x>/run": that member must not
    # start a sample of its own, or sample 1 would arrive without it
    path = str(tmp_path / "shard-0.tar")
    keys = [f"{'x' * 90}/run.2024-06/{i:06d}" for i in range(4)]
    with tarfile.open(path, "w", format=fmt) as tar:
        for key in keys:
            for member in ("0.png", "1.png", "json"):
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(content := _content(key[-6:], member))
                tar.addfile(info, io.BytesIO(content))
    written = {key: {m: _content(key[-6:], m) for m in ("0.png", "1.png", "json")} for key in keys}
    assert _read(path) == (written, [])
    with tarfile.open(path) as tar:
        long_name_header = tar.getmember(f"{keys[1]}.1.png").offset
    with open(path, "r+b") as f:
        f.seek(long_name_header)
        f.write(_garbage(bytes(tarfile.BLOCKSIZE)))
    samples, skipped = _read(path)
    assert samples == {k: v for k, v in written.items() if k != keys[1]}
    assert [(s.reason, s.key) for s in skipped] == [("damaged_member", f"shard-0.tar/{keys[1]}")]


def test_a_gzipped_shard_reads_like_a_plain_one(tmp_path):
    path = str(tmp_path / "shard-0.tar")
    written = _write_shard(path)
    with open(path, "rb") as plain, gzip.open(str(tmp_path / "shard-0.tar.gz"), "wb") as packed:
        packed.write(plain.read())
    assert _read(str(tmp_path / "shard-0.tar.gz")) == (written, [])


def test_an_empty_file_is_a_broken_shard(tmp_path):
    path = tmp_path / "shard-0.tar"
    path.write_bytes(b"")
    assert [(s.reason, s.key) for s in _read(str(path))[1]] == [("broken_shard", str(path))]
