"""webdataset tar shards as a balancer source: shard order, decoding, bad data that never stops an epoch.

Sample layout in a shard (one webdataset sample = the files sharing a key)::

    000123.json        {"text_tokens": 412, "outputs": [[512, 512]]}   ("outputs" optional)
    000123.jpg         input images: any of .jpg .jpeg .png .webp .bmp, ordered by file name
    000123.1.png
    000123.video.npy   input videos: uint8 arrays (frames, height, width[, channels])

A corrupt image or video, or a bad size, is skipped with a counted warning
(:class:`~balancer.samples.CorruptSample`). Shards are read here rather than by ``tarfile``,
which takes a damaged header for the end of the archive and so silently drops the rest of the
shard (and the damaged sample's later members): after a block that is not a valid header,
reading resumes at the next block whose header checksum verifies. The members in between are
lost and cannot be named, so the sample being read when the damage starts and the sample of
the first member after it (one sample when both sides share a key) are skipped whole and
counted as ``damaged_member``: a sample never arrives with a member missing. A shard that
cannot be opened, or has no valid header after the damage, yields a
:class:`~balancer.steps.Skipped` ``broken_shard`` marker for its rest and the stream moves on to
the next shard. Healthy shards are read a member at a time (one read per header and per
member); the block-by-block scan runs only after damage.

Every replica reads every shard and must see the same bytes: a transient read error on one
replica only would make the replicas' plans differ, so retry transient errors below this layer
(e.g. a local cache or a retrying URL opener). Shards are tar files, gzip-compressed when
their name ends in ``.gz`` or ``.tgz``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from .samples import CorruptSample, Sample
from .steps import Skipped
from .stream import Source

__all__ = ["IMAGE_EXTENSIONS", "decode_sample", "webdataset_source"]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp"})

_BLOCK = tarfile.BLOCKSIZE
_NAME_FIELD = 100
"""Bytes of a tar header's name field; longer names go in a pax or GNU long-name header before it."""
_META = re.compile(r"__[^/]*__($|/)")
"""Names webdataset reserves for shard metadata: not members of any sample."""


@dataclass(frozen=True)
class _Member:
    """A regular file of the tar archive."""

    name: str
    data: bytes | None
    """None when the shard ends inside the file."""
    sure_name: bool
    """False when the name fills the header's 100-byte field with no long-name header before it:
    after damage, it may be a long name cut short because its pax or GNU header was lost."""


@dataclass(frozen=True)
class _Damage:
    """Bytes that hold no readable tar header, from ``start`` to the next valid one."""

    start: int
    resumed: int | None
    """Offset of the next valid header; None when there is none (the rest of the shard is lost)."""
    why: str

    def describe(self, url: str) -> str:
        where = f"{self.why} at byte {self.start} of {url}"
        if self.resumed is None:
            return f"{where}, and no valid tar header after it"
        return f"{where}: bytes {self.start}-{self.resumed} skipped to the next valid tar header"


class _Reader:
    """A shard's bytes read forward only (pipes and HTTP streams cannot seek), counting the offset."""

    def __init__(self, stream: BinaryIO):
        self._stream, self.offset = stream, 0

    def read(self, size: int) -> bytes:
        """``size`` bytes, fewer only at the end of the stream."""
        parts = [self._stream.read(size)]
        got = len(parts[0])
        while 0 < got < size and (part := self._stream.read(size - got)):  # a raw pipe may read short
            parts.append(part)
            got += len(part)
        self.offset += got
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _zeros(block: bytes) -> bool:
    return not block.strip(b"\0")


def _header(block: bytes) -> tarfile.TarInfo | str:
    """The tar header in ``block``, or why there is none (for the warning)."""
    if len(block) < _BLOCK:
        return "a tar header cut short by the end of the shard"
    if _zeros(block):
        return "a block of zeros"
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as err:  # bad checksum or unparsable fields
        return f"a damaged tar header ({err})"


def _resync(reader: _Reader, start: int, block: bytes, why: str) -> tuple[_Damage | None, bytes]:
    """Scan on from the non-header ``block`` at ``start`` to the next valid header (returned with the damage).

    Zero blocks up to the end of the shard are the end of the archive, not damage; a zero block
    followed by anything else is a zeroed header.
    """
    only_zeros = _zeros(block)
    while len(block := reader.read(_BLOCK)) == _BLOCK:
        if not isinstance(_header(block), str):
            return _Damage(start, reader.offset - _BLOCK, why), block
        only_zeros = only_zeros and _zeros(block)
    if only_zeros and _zeros(block):
        return None, b""
    return _Damage(start, None, why), b""


def _long_name(info: tarfile.TarInfo, data: bytes) -> str | None:
    """The name a pax or GNU long-name header gives the next member (names over 100 bytes), if any."""
    if info.type == tarfile.GNUTYPE_LONGNAME:
        return data.rstrip(b"\0").decode("utf-8", "surrogateescape")
    name = None
    for record in data.split(b"\n"):  # "<length> <keyword>=<value>"; a path holds no newline
        keyword, _, value = record.partition(b" ")[2].partition(b"=")
        if keyword == b"path":
            name = value.decode("utf-8", "surrogateescape")
    return name


def _members(reader: _Reader) -> Iterator[_Member | _Damage]:
    """The archive's regular files in order, with a :class:`_Damage` wherever headers are unreadable."""
    long_name: str | None = None
    block = reader.read(_BLOCK)
    if not block:  # a failed download, say; a tar archive has at least its end-of-archive blocks
        yield _Damage(0, None, "an empty file instead of a tar archive")
    while block:
        start, info = reader.offset - len(block), _header(block)
        if isinstance(info, str):
            damage, block = _resync(reader, start, block, info)
            if damage is not None:
                yield damage
            long_name = None
            continue
        data = reader.read(info.size)
        whole = len(data) == info.size
        reader.read(-info.size % _BLOCK)  # padding to the next block
        if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME) and whole:
            long_name = _long_name(info, data) or long_name
        else:
            if info.isreg():
                sure = long_name is not None or block[_NAME_FIELD - 1] == 0
                yield _Member(long_name or info.name, data if whole else None, sure)
            if not whole:
                yield _Damage(start, None, f"member {info.name!r} cut short by the end of the shard")
                return
            long_name = None
        block = reader.read(_BLOCK)


def _skip(url: str, sample: dict[str, Any], why: str) -> Skipped:
    """The marker for a sample that lost a member: counted, warned, never yielded incomplete."""
    members = sum(1 for name in sample if not name.startswith("__"))
    key = f"{os.path.basename(url)}/{sample['__key__']}"
    return Skipped("damaged_member", key, f"{why}; its {members} readable member(s) dropped with it")


def _samples(url: str, members: Iterable[_Member | _Damage]) -> Iterator[dict[str, Any] | Skipped]:
    """Group members into webdataset samples by key, skipping every sample damage may have touched.

    Members lost to damage have no name, so they may belong to the sample read before the damage,
    to the sample of the first member after it, or to samples entirely inside it: the two
    neighbours are both skipped. A member right after damage whose name may have been cut short
    (see :attr:`_Member.sure_name`) counts as part of the damage: a cut name can spell another key
    (``dir/run.2024-06/000001.png`` cut to ``dir/run.2024-``), and that wrong sample would let the
    right one arrive without it.
    """
    sample: dict[str, Any] | None = None
    why: str | None = None  # why ``sample`` is skipped; None while it is whole
    damage: str | None = None  # damage just read: the next member's sample may have lost members
    broken: str | None = None  # damage with no valid header after it
    for member in members:
        if isinstance(member, _Damage):
            damage = member.describe(url)
            why = why or (damage if sample is not None else None)
            if member.resumed is None:
                broken = damage
            continue
        key, ext = base_plus_ext(member.name)
        if key is None or _META.match(member.name) or (damage is not None and not member.sure_name):
            continue  # not a sample's member, or (right after damage) of a sample in doubt
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample if why is None else _skip(url, sample, why)
            sample, why = {"__key__": key, "__url__": url}, damage
        damage = None
        if member.data is None:  # cut short: the damage that follows skips the sample
            continue
        if ext.lower() in sample:
            why = why or f"two members named {member.name!r}"
        sample[ext.lower()] = member.data
    if sample is not None:
        yield sample if why is None else _skip(url, sample, why)
    if broken is not None:
        yield Skipped("broken_shard", url, broken)


def _read_shard(url: str) -> Iterator[dict[str, Any] | Skipped]:
    """One shard's samples, then a ``broken_shard`` marker if it could not be read to its end."""
    stream = None
    try:
        stream = wds.gopen(url)
        tar = gzip.GzipFile(fileobj=stream) if url.endswith((".gz", ".tgz")) else stream
        yield from _samples(url, _members(_Reader(tar)))
        stream.close()  # a pipe: its command's exit status arrives here, part of reading the shard
    except Exception as err:  # a broken shard must not end the epoch; whatever the opener or IO raised
        yield Skipped("broken_shard", url, f"{type(err).__name__}: {err}")
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):  # abandoned mid-shard: no one is left to tell
                stream.close()


def webdataset_source(urls: Sequence[str], *, seed: int = 0, shuffle: bool = True) -> Source:
    """A :class:`~balancer.stream.Source` over tar shards, in a shard order shuffled per ``(seed, epoch)``.

    Every replica reads every shard (see :mod:`balancer.stream` for why and what it costs);
    shards may have any sizes.
    """
    urls = list(urls)
    if not urls:
        raise ValueError("webdataset_source got no shard URLs: pass a non-empty list of .tar paths or URLs")

    def source(epoch: int) -> Iterator[Any]:
        order = np.random.default_rng([seed, epoch]).permutation(len(urls)) if shuffle else range(len(urls))
        for i in order:
            yield from _read_shard(urls[i])

    return source


def _metadata(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """The sample's ``.json`` metadata; its sizes are checked where the descriptor is built."""
    if "json" not in raw:
        raise CorruptSample(key, "no .json metadata (needs at least 'text_tokens')")
    try:
        meta = json.loads(raw["json"])
    except ValueError as err:
        raise CorruptSample(key, f"bad .json metadata: {err}") from err
    if not isinstance(meta, dict) or "text_tokens" not in meta:
        raise CorruptSample(key, f"the .json metadata has no 'text_tokens': {meta!r:.200}")
    return meta


def decode_sample(raw: dict[str, Any]) -> tuple[dict[str, Any], Sample]:
    """Decode one raw webdataset sample into ``({"key", "meta", "images", "videos"}, Sample)``.

    Images are fully decoded (PIL, RGB) here, not later in a collate function, so that a
    corrupt file is caught while the balancer can still skip it. Raises
    :class:`~balancer.samples.CorruptSample` for undecodable content, missing metadata or a bad
    size (NaN, infinite, negative), naming the field and its value.
    """
    from PIL import Image  # matplotlib's dependency; only this adapter needs it

    key = f"{os.path.basename(str(raw.get('__url__', '')))}/{raw.get('__key__', '?')}"
    meta = _metadata(raw, key)
    images, videos = [], []
    for name in sorted(n for n in raw if not n.startswith("__")):
        ext = name.rsplit(".", 1)[-1].lower()
        try:
            if ext in IMAGE_EXTENSIONS:
                with Image.open(io.BytesIO(raw[name])) as img:
                    images.append(img.convert("RGB"))  # convert() decodes every pixel
            elif ext == "npy":
                video = np.load(io.BytesIO(raw[name]), allow_pickle=False)
                if video.ndim not in (3, 4):
                    raise ValueError(
                        f"video array has shape {video.shape}; expected (frames, height, width[, channels])"
                    )
                videos.append(video)
        except Exception as err:  # PIL and numpy raise many types for damaged files
            raise CorruptSample(key, f"cannot decode {name!r}: {type(err).__name__}: {err}") from err
    sample = Sample(
        key=key,
        text_tokens=meta["text_tokens"],
        images=tuple((img.height, img.width) for img in images),
        videos=tuple(v.shape[:3] for v in videos),
        outputs=meta.get("outputs", ()),
    )
    return {"key": key, "meta": meta, "images": images, "videos": videos}, sample
