"""The shards as a map-style HF ``datasets`` table, and its rows as records (the ``reader="hf"`` path)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .shards import MAX_IMAGES
from .sources import Record

__all__ = ["hf_dataset", "record_from_row"]


def hf_dataset(urls: Sequence[str], cache_dir: str) -> Any:
    """The shards as a map-style HF ``datasets.Dataset`` (Arrow, cached under ``cache_dir``).

    Columns are the webdataset file names (``json``, ``0.png``, ``1.png``, ``video.npy``,
    ``target.png``, ``__key__``); a sample without a file has None there. The features are given
    explicitly because HF infers them from the first few samples, which need not have every file.
    """
    import datasets as hf

    ints = hf.Sequence(hf.Sequence(hf.Value("int64")))
    meta = {"kind": hf.Value("string"), "prompt": hf.Value("string"), "answer": hf.Value("string"),
            "choices": hf.Value("int64"), "text_tokens": hf.Value("int64"),
            "images": ints, "videos": ints, "outputs": ints}  # fmt: skip
    features = hf.Features(
        {
            "json": meta,
            **{f"{i}.png": hf.Image() for i in range(MAX_IMAGES)},
            "video.npy": hf.Sequence(hf.Sequence(hf.Sequence(hf.Sequence(hf.Value("uint8"))))),
            "target.png": hf.Image(),
            "__key__": hf.Value("string"),
            "__url__": hf.Value("string"),
        }
    )
    return hf.load_dataset(
        "webdataset", data_files={"train": list(urls)}, split="train", features=features, cache_dir=cache_dir
    )


def record_from_row(row: dict[str, Any]) -> Record:
    """One HF row -> a :class:`Record` (decodes its images)."""
    rgb = lambda img: np.asarray(img.convert("RGB"))  # noqa: E731
    images = [rgb(row[f"{i}.png"]) for i in range(MAX_IMAGES) if row[f"{i}.png"] is not None]
    videos = [np.asarray(row["video.npy"], np.uint8)] if row["video.npy"] is not None else []
    outputs = [rgb(row["target.png"])] if row["target.png"] is not None else []
    meta = {k: row["json"][k] for k in ("kind", "prompt", "answer", "choices")}
    return Record(row["__key__"], meta, images, videos, outputs)
