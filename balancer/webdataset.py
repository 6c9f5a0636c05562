"""webdataset tar shards as a balancer source: shard order, decoding, bad data that never stops an epoch.

Sample layout in a shard (one webdataset sample = the files sharing a key)::

    000123.json        {"text_tokens": 412, "outputs": [[512, 512]]}   ("outputs" optional)
    000123.jpg         input images: any of .jpg .jpeg .png .webp .bmp, ordered by file name
    000123.1.png
    000123.video.npy   input videos: uint8 arrays (frames, height, width[, channels])

A corrupt image or video is skipped with a counted warning (:class:`~balancer.steps.CorruptSample`);
a shard that cannot be opened or breaks mid-way yields a :class:`~balancer.steps.Skipped` marker
and the stream moves on to the next shard. Every replica reads every shard and must see the same
bytes: a transient read error on one replica only would make the replicas' plans differ, so
retry transient errors below this layer (e.g. a local cache or a retrying URL opener).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import webdataset as wds

from .samples import Sample
from .steps import CorruptSample, Skipped
from .stream import Source

__all__ = ["IMAGE_EXTENSIONS", "decode_sample", "webdataset_source"]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp"})


def _read_shard(url: str) -> Iterator[Any]:
    try:
        yield from wds.tarfile_samples([{"url": url}])
    except Exception as err:  # a broken shard must not end the epoch; whatever tar/gzip/IO raised
        yield Skipped("broken_shard", url, f"{type(err).__name__}: {err}")


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


def decode_sample(raw: dict[str, Any]) -> tuple[dict[str, Any], Sample]:
    """Decode one raw webdataset sample into ``({"key", "meta", "images", "videos"}, Sample)``.

    Images are fully decoded (PIL, RGB) here, not later in a collate function, so that a
    corrupt file is caught while the balancer can still skip it. Raises
    :class:`~balancer.steps.CorruptSample` for undecodable content or missing metadata.
    """
    from PIL import Image  # matplotlib's dependency; only this adapter needs it

    key = f"{os.path.basename(str(raw.get('__url__', '')))}/{raw.get('__key__', '?')}"
    if "json" not in raw:
        raise CorruptSample(key, "no .json metadata (needs at least 'text_tokens')")
    try:
        meta = json.loads(raw["json"])
        text_tokens = int(meta["text_tokens"])
        outputs = tuple((int(h), int(w)) for h, w in meta.get("outputs", ()))
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptSample(key, f"bad .json metadata: {err}") from err
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
    try:
        sample = Sample(
            key=key,
            text_tokens=text_tokens,
            images=tuple((img.height, img.width) for img in images),
            videos=tuple(v.shape[:3] for v in videos),
            outputs=outputs,
        )
    except ValueError as err:  # e.g. negative text_tokens or an empty video
        raise CorruptSample(key, str(err)) from err
    return {"key": key, "meta": meta, "images": images, "videos": videos}, sample
