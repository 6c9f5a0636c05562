"""The example's samples as webdataset tar shards: generated once per split and cached, read back as records.

:func:`build_shards` generates each source's split (:mod:`examples.mllm.sources`) and caches it in
the layout of :mod:`balancer.webdataset`::

    shapes-train-000042.json        {"kind", "prompt", "answer", "choices", "text_tokens",
                                     "images": [[h, w]], "videos": [[t, h, w]], "outputs": [[h, w]]}
    shapes-train-000042.0.png       input images (at most two: .0.png, .1.png)
    shapes-train-000042.video.npy   an input video, uint8 [T, H, W, 3]
    shapes-train-000042.target.png  the image the generator should produce

:func:`read_raw` turns one raw sample of the stream back into a record; :mod:`examples.mllm.hf_rows`
reads the same tars as an HF ``datasets`` table.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from balancer import CorruptSample
from balancer.webdataset import decode_sample

from .collate import describe, metadata_with_sizes
from .config import DataConfig, ModelConfig
from .sources import Record, records

__all__ = ["MAX_IMAGES", "build_shards", "read_raw"]

MAX_IMAGES = 2
"""Input images per shard sample (``0.png``, ``1.png``)."""
_FORMAT = 2  # bump when the generated content or layout changes: the cache key includes it


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="png")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _write(record: Record, cfg: ModelConfig) -> dict[str, Any]:
    """One record as webdataset files (see the module docstring)."""
    if len(record.images) > MAX_IMAGES or len(record.videos) > 1 or len(record.outputs) > 1:
        raise ValueError(f"{record.key}: a shard sample has at most {MAX_IMAGES} images, 1 video, 1 output")
    meta = metadata_with_sizes(record)
    meta["text_tokens"] = describe(record.key, meta, cfg).text_tokens
    files: dict[str, Any] = {"__key__": record.key, "json": json.dumps(meta).encode()}
    files.update({f"{i}.png": _png(img) for i, img in enumerate(record.images)})
    if record.videos:
        files["video.npy"] = _npy(record.videos[0])
    if record.outputs:
        files["target.png"] = _png(record.outputs[0])
    return files


def build_shards(data: DataConfig, source: str, split: str, model: ModelConfig) -> list[str]:
    """The shard paths of ``source``'s ``split``, generating them on first use.

    The cache directory is named after everything that decides its content, so a changed setting
    generates a new cache instead of reading a stale one. Shards are written to a temporary
    directory and renamed into place: concurrent processes never see a half-written cache.
    """
    count = data.train_samples if split == "train" else data.val_samples
    key = {"format": _FORMAT, "source": source, "split": split, "count": count, "seed": data.seed,
           "per_shard": data.samples_per_shard, "patch": model.patch_size, "merge": model.merge}  # fmt: skip
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    final = Path(data.cache_dir) / f"{source}-{split}-{digest}"
    if not final.is_dir():
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        writer = None
        progress = tqdm(records(source, data.seed, split, count), total=count, unit="sample",
                        desc=f"generating {source}-{split}", disable=count < 1000, leave=False)  # fmt: skip
        for i, record in enumerate(progress):
            if i % data.samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                writer = wds.TarWriter(str(tmp / f"{source}-{split}-{i // data.samples_per_shard:05d}.tar"))
            writer.write(_write(record, model))
        if writer is not None:
            writer.close()
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: its shards are identical
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(str(p) for p in final.glob("*.tar"))


def read_raw(raw: dict[str, Any]) -> Record:
    """A raw webdataset sample (a dict of file bytes) -> its :class:`Record`, every pixel decoded.

    Decoding is :func:`balancer.webdataset.decode_sample`'s, which raises
    :class:`balancer.CorruptSample` for a damaged file so that the stream skips it; the generation
    target is split off first, since that decoder counts every PNG as an input image.
    """
    raw = dict(raw)
    target = raw.pop("target.png", None)
    item, _ = decode_sample(raw)
    key = str(raw["__key__"])
    try:
        outputs = [np.asarray(Image.open(io.BytesIO(target)).convert("RGB"))] if target is not None else []
    except Exception as err:  # PIL raises many types for damaged files
        raise CorruptSample(key, f"cannot decode 'target.png': {type(err).__name__}: {err}") from err
    meta = {k: item["meta"][k] for k in ("kind", "prompt", "answer", "choices")}
    images = [np.asarray(img) for img in item["images"]]
    return Record(key, meta, images, [np.asarray(v) for v in item["videos"]], outputs)
