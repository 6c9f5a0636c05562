"""The example's data path: generated shards -> (webdataset | HF datasets) -> balancer -> packed microbatches.

1. :func:`build_shards` generates each source's split once (:mod:`examples.mllm.sources`) and caches
   it as webdataset tar shards in the layout of :mod:`balancer.webdataset`::

       shapes-train-000042.json        {"kind", "prompt", "answer", "choices", "text_tokens",
                                        "images": [[h, w]], "videos": [[t, h, w]], "outputs": [[h, w]]}
       shapes-train-000042.0.png       input images (at most two: .0.png, .1.png)
       shapes-train-000042.video.npy   an input video, uint8 [T, H, W, 3]
       shapes-train-000042.target.png  the image the generator should produce

2. The shards are read either as a stream (``webdataset`` through :class:`balancer.BalancedStream`)
   or as a map-style HF ``datasets.Dataset`` (``load_dataset("webdataset", ...)`` over the same tars,
   through :class:`balancer.BalancedBatchSampler`). Both give :class:`~examples.mllm.sources.Record` s.
3. :func:`describe` turns a record's metadata into the balancer's :class:`balancer.Sample` (sizes only,
   no pixels); the balancer packs samples into the microbatches of each step under a token cap.
4. :func:`pack` makes one microbatch, one packed sequence of several samples, a dict of tensors::

       tokens       [S]            int64  token ids of every sample, one after the other
       labels       [S]            int64  next-token target per position, -100: none
       segments     [S]            int64  which sample of the pack a position belongs to
       positions    [S]            int64  position within its sample (rotary), from 0 per sample
       scored       [S]            bool   label positions that are answer words of a scored question
       choices      [n]            int64  per sample: answers possible (chance = 1 / choices; 0: unscored)
       patches      [N, 3*p*p]     float  every encoder patch, in [-1, 1]: images, then video frames
       patch_pos    [N, 3]         int64  (row, column, frame) of each patch
       patch_spans  [N]            int64  which image or video frame of the pack a patch belongs to
       gen_target   [G, 3*p*p]     float  clean patches of the images to generate, in [-1, 1]
       gen_noise    [G, 3*p*p]     float  flow-matching noise, drawn here so every rank agrees on it
       gen_time     [G]            float  flow-matching time in [0, 1)
       gen_pos      [G, 2]         int64  (row, column) of each patch to generate
       keys         tuple[str]            sample keys (a Python value; every rank receives it)

   A sample's tokens are ``<bos> (<image> <img>*k)* (<video> <img>*k)* prompt <sep> answer <eos>
   <gen>*g``: each ``<img>`` is replaced by one projected encoder token (``merge x merge`` patches) and
   each ``<gen>`` position's hidden state conditions one generated patch. The model keeps samples
   apart with ``segments`` (block-diagonal causal attention) and ``positions``, so a pack's loss is
   the sum of its samples' losses computed alone.
5. :class:`ExampleDataModule` wires it into Lightning, split by data-parallel rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zlib
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from balancer import (
    BalancedBatchSampler,
    BalancedStream,
    BalancerConfig,
    CorruptSample,
    CostModel,
    Geometry,
    Sample,
    StepBatch,
    StepDataset,
)
from balancer.webdataset import decode_sample, webdataset_source
from lightning_bigmac import Microbatches

from .config import DataConfig, ModelConfig
from .sources import COLOURS, DIRECTIONS, NUMBERS, PHOTOS, SHAPES, Record, records

__all__ = [
    "BOS",
    "EOS",
    "GEN",
    "IMG",
    "PAD",
    "SEP",
    "VOCAB",
    "ExampleDataModule",
    "balancer_config",
    "build_shards",
    "collate_step",
    "decode",
    "describe",
    "encode",
    "hf_dataset",
    "metadata_with_sizes",
    "pack",
    "patchify",
    "read_raw",
    "record_from_row",
    "unpatchify",
]

# ---- tokenizer -----------------------------------------------------------------------------------
SPECIAL = ("<pad>", "<bos>", "<eos>", "<sep>", "<image>", "<video>", "<img>", "<gen>")
WORDS = (
    *("a", "the", "is", "are", "what", "which", "how", "many", "way", "does", "comes", "after", "in"),
    *("this", "these", "of", "has", "more", "same", "there", "shapes", "shape", "colour", "image"),
    *("describe", "move", "photo", "camera", "draw", "first", "second", "yes", "no", "?"),
    *COLOURS, *SHAPES, *NUMBERS, *DIRECTIONS, *PHOTOS,
    "where",  # the layout source (fine-tuning); new words go last so saved models keep their ids
)  # fmt: skip
VOCAB: tuple[str, ...] = SPECIAL + tuple(dict.fromkeys(WORDS))
"""Every token: the specials, then the words of every source's prompts and answers."""
_ID = {word: i for i, word in enumerate(VOCAB)}
PAD, BOS, EOS, SEP, IMAGE, VIDEO, IMG, GEN = range(len(SPECIAL))


def encode(text: str) -> list[int]:
    """Word-level token ids of ``text`` (space separated); an unknown word is a ``ValueError``."""
    try:
        return [_ID[w] for w in text.split()]
    except KeyError as err:
        raise ValueError(f"word {err.args[0]!r} of {text!r} is not in the vocabulary (data.VOCAB)") from err


def decode(ids: Sequence[int]) -> str:
    return " ".join(VOCAB[i] for i in ids)


# ---- pixels <-> patches --------------------------------------------------------------------------
def _tokens_per_image(h: int, w: int, cfg: ModelConfig) -> int:
    side = cfg.patch_size * cfg.merge
    return -(-h // side) * -(-w // side)


def patchify(img: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """An image ``[H, W, 3]`` uint8 at its native size -> ``(patches [N, 3*p*p] in [-1, 1], rc [N, 2])``.

    The image is padded (black) to whole LLM tokens. Patches are ordered token by token, the
    ``merge x merge`` patches of one token consecutive, so the projector merges them with a reshape.
    """
    p, m = cfg.patch_size, cfg.merge
    h, w = img.shape[:2]
    th, tw = -(-h // (p * m)), -(-w // (p * m))  # LLM tokens per side
    if th * m > cfg.max_grid or tw * m > cfg.max_grid:
        raise ValueError(
            f"image of {h}x{w} pixels has {th * m}x{tw * m} patches, over ModelConfig.max_grid="
            f"{cfg.max_grid}: resize it or raise max_grid"
        )
    x = np.full((th * m * p, tw * m * p, 3), -1.0, np.float32)
    x[:h, :w] = img / 127.5 - 1.0
    x = x.reshape(th, m, p, tw, m, p, 3).transpose(0, 3, 1, 4, 2, 5, 6)  # [th, tw, m, m, p, p, 3]
    ty, tx, sy, sx = np.meshgrid(np.arange(th), np.arange(tw), np.arange(m), np.arange(m), indexing="ij")
    rc = np.stack([ty * m + sy, tx * m + sx], axis=-1).reshape(-1, 2)  # [N, 2]
    return x.reshape(-1, 3 * p * p), rc


def _grid_patches(img: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major ``p x p`` patches of an image to generate: ``([G, 3*p*p] in [-1, 1], rc [G, 2])``."""
    h, w = img.shape[0] // p, img.shape[1] // p
    x = (img[: h * p, : w * p] / 127.5 - 1.0).astype(np.float32)
    x = x.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, 3 * p * p)  # [G, 3*p*p]
    rc = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), axis=-1).reshape(-1, 2)
    return x, rc


def unpatchify(patches: torch.Tensor, height: int, width: int, p: int) -> np.ndarray:
    """Generated row-major patches ``[G, 3*p*p]`` in [-1, 1] -> an image ``[height, width, 3]`` uint8."""
    h, w = height // p, width // p
    x = patches.detach().float().reshape(h, w, p, p, 3).permute(0, 2, 1, 3, 4).reshape(h * p, w * p, 3)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


# ---- a sample's sequence, descriptor and microbatch ---------------------------------------------
def _layout(meta: dict[str, Any], cfg: ModelConfig) -> tuple[list[int], int, int]:
    """A sample's token ids (visual placeholders expanded), where its answer starts, its answer length."""
    ids = [BOS]
    for h, w in meta["images"]:
        ids += [IMAGE] + [IMG] * _tokens_per_image(h, w, cfg)
    for t, h, w in meta["videos"]:
        ids += [VIDEO] + [IMG] * (t * _tokens_per_image(h, w, cfg))
    ids += [*encode(meta["prompt"]), SEP]
    start, answer = len(ids), encode(meta["answer"])
    ids += [*answer, EOS] if answer else []
    for h, w in meta["outputs"]:
        ids += [GEN] * ((h // cfg.patch_size) * (w // cfg.patch_size))
    return ids, start, len(answer)


def describe(key: str, meta: dict[str, Any], cfg: ModelConfig) -> Sample:
    """The balancer's descriptor of a sample, from its metadata alone (no pixels are decoded).

    Its ``text_tokens`` are every token that is not an image or video token (the ``<gen>`` positions
    included), so the balancer's token count equals the packed length (``temporal_patch=1``).
    """
    ids, _, _ = _layout(meta, cfg)
    return Sample(
        key=key,
        text_tokens=sum(1 for i in ids if i != IMG),
        images=tuple(tuple(s) for s in meta["images"]),
        videos=tuple(tuple(s) for s in meta["videos"]),
        outputs=tuple(tuple(s) for s in meta["outputs"]),
    )


def metadata_with_sizes(record: Record) -> dict[str, Any]:
    """A record's metadata plus the pixel sizes (what :func:`describe` needs)."""
    return {
        **record.meta,
        "images": [list(i.shape[:2]) for i in record.images],
        "videos": [list(v.shape[:3]) for v in record.videos],
        "outputs": [list(o.shape[:2]) for o in record.outputs],
    }


def pack(samples: Sequence[Record], cfg: ModelConfig, *, seed: int = 0) -> dict[str, Any]:
    """One microbatch: ``samples`` packed into one sequence (the format is in the module docstring).

    The flow-matching noise and times are drawn from ``(seed, key)``: a sample gets the same draws
    wherever it is packed, which makes a pack's loss exactly the sum of its samples' losses.
    """
    text: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per sample: ids, labels, scored
    vision: list[tuple[np.ndarray, np.ndarray]] = []  # per image or frame: patches, (row, col, frame)
    gen: list[tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]] = []  # per output: x1, rc, x0, t
    for rec in samples:
        ids, start, n_answer = _layout(metadata_with_sizes(rec), cfg)
        labels = np.full(len(ids), -100, np.int64)
        if n_answer:  # positions start-1 .. start+n_answer-1 predict the answer words and <eos>
            labels[start - 1 : start + n_answer] = ids[start : start + n_answer + 1]
        scored = np.zeros(len(ids), bool)
        scored[start - 1 : start - 1 + n_answer] = rec.meta["choices"] > 0
        text.append((np.asarray(ids, np.int64), labels, scored))
        frames = [(img, 0) for img in rec.images] + [(f, t) for v in rec.videos for t, f in enumerate(v)]
        for img, t in frames:
            x, rc = patchify(img, cfg)
            vision.append((x, np.concatenate([rc, np.full((len(rc), 1), t)], axis=1)))
        for out in rec.outputs:
            x, rc = _grid_patches(out, cfg.patch_size)
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(rec.key.encode()))
            gen.append((x, rc, torch.randn(x.shape, generator=g), torch.rand(len(x), generator=g)))
    d = cfg.patch_dim
    return {
        "tokens": _cat([ids for ids, _, _ in text], (0,), torch.int64),
        "labels": _cat([labels for _, labels, _ in text], (0,), torch.int64),
        "segments": _spans([len(ids) for ids, _, _ in text]),
        "positions": _cat([np.arange(len(ids)) for ids, _, _ in text], (0,), torch.int64),
        "scored": _cat([scored for _, _, scored in text], (0,), torch.bool),
        "choices": torch.tensor([r.meta["choices"] for r in samples], dtype=torch.int64),
        "patches": _cat([x for x, _ in vision], (0, d), torch.float32),
        "patch_pos": _cat([pos for _, pos in vision], (0, 3), torch.int64),
        "patch_spans": _spans([len(x) for x, _ in vision]),
        "gen_target": _cat([x for x, *_ in gen], (0, d), torch.float32),
        "gen_pos": _cat([rc for _, rc, *_ in gen], (0, 2), torch.int64),
        "gen_noise": torch.cat([x0 for *_, x0, _ in gen]) if gen else torch.zeros(0, d),
        "gen_time": torch.cat([t for *_, t in gen]) if gen else torch.zeros(0),
        "keys": tuple(r.key for r in samples),
    }


def _cat(arrays: list[np.ndarray], empty: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Concatenate along dim 0; ``empty`` is the shape when there is nothing (e.g. a text-only pack)."""
    return torch.from_numpy(np.concatenate(arrays)).to(dtype) if arrays else torch.zeros(empty, dtype=dtype)


def _spans(lengths: list[int]) -> torch.Tensor:
    """Segment ids: ``[0] * lengths[0] + [1] * lengths[1] + ...``."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))


def collate_step(step: StepBatch, cfg: ModelConfig, *, train: bool) -> Microbatches:
    """A balancer step of records -> the packed microbatches and owners the strategy consumes.

    Returns a :class:`lightning_bigmac.Microbatches`, not the ``StepBatch``: Lightning moves batches
    to the device with ``apply_to_collection``, which cannot rebuild a frozen dataclass.
    Training steps draw fresh generator noise every epoch; validation keeps it fixed, so that
    validation losses of different epochs are comparable.
    """
    seed = step.epoch + 1 if train else 0
    return Microbatches(
        [pack(mb, cfg, seed=seed) for mb in step.microbatches], list(step.owners), state=dict(step.state)
    )


def balancer_config(data: DataConfig, model: ModelConfig, *, pipeline_size: int = 1) -> BalancerConfig:
    """How the balancer packs this example: its geometry and document-masked (per-sample) attention."""
    p = model.patch_size
    geometry = Geometry(patch_size=p, merge=model.merge, temporal_patch=1, latent_patch=p)
    return BalancerConfig(
        pipeline_size=pipeline_size,
        microbatches=data.microbatches,
        token_cap=data.token_cap,
        cost_model=CostModel(geometry=geometry, llm_attention="sample"),
    )


# ---- shards ------------------------------------------------------------------------------------
_MAX_IMAGES = 2
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
    if len(record.images) > _MAX_IMAGES or len(record.videos) > 1 or len(record.outputs) > 1:
        raise ValueError(f"{record.key}: a shard sample has at most {_MAX_IMAGES} images, 1 video, 1 output")
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


# ---- readers -----------------------------------------------------------------------------------
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


def _describe_raw(raw: dict[str, Any], cfg: ModelConfig) -> tuple[Record, Sample]:
    """``describe`` for :class:`balancer.BalancedStream`: (what the step carries, its descriptor)."""
    record = read_raw(raw)
    return record, describe(record.key, metadata_with_sizes(record), cfg)


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
            **{f"{i}.png": hf.Image() for i in range(_MAX_IMAGES)},
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
    images = [rgb(row[f"{i}.png"]) for i in range(_MAX_IMAGES) if row[f"{i}.png"] is not None]
    videos = [np.asarray(row["video.npy"], np.uint8)] if row["video.npy"] is not None else []
    outputs = [rgb(row["target.png"])] if row["target.png"] is not None else []
    meta = {k: row["json"][k] for k in ("kind", "prompt", "answer", "choices")}
    return Record(row["__key__"], meta, images, videos, outputs)


class _Records:
    """An HF dataset seen as records: what :class:`balancer.StepDataset` fetches rows from."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Record:
        return record_from_row(self.dataset[index])

    def __getitems__(self, indices: list[int]) -> list[Record]:
        return [record_from_row(row) for row in self.dataset.__getitems__(indices)]


class _Steps(IterableDataset):
    """A balanced stream as an ``IterableDataset`` of collated steps (load with ``batch_size=None``)."""

    def __init__(self, stream: BalancedStream, cfg: ModelConfig, train: bool):
        self.stream, self.cfg, self.train = stream, cfg, train

    def __iter__(self) -> Iterator[Microbatches]:
        return (collate_step(step, self.cfg, train=self.train) for step in self.stream)


# ---- Lightning -----------------------------------------------------------------------------------
class ExampleDataModule(pl.LightningDataModule):
    """The example data as balanced steps of packed microbatches, split by data-parallel rank.

    Under a distributed strategy every replica plans the global step and takes its share
    (``distributed_sampler_kwargs`` gives the replica), every pipeline rank of a replica gets the
    same steps, and the pipeline size sets the balancer's group size. Pass
    ``Trainer(use_distributed_sampler=False)``: the balancer splits by replica itself.
    """

    def __init__(self, config: DataConfig | None = None, model: ModelConfig | None = None):
        super().__init__()
        self.config = config or DataConfig()
        self.model = model or ModelConfig()

    def shards(self, split: str) -> list[str]:
        """Every source's shards of ``split`` (generated on first use)."""
        cfg, model = self.config, self.model
        return [url for source in cfg.sources for url in build_shards(cfg, source, split, model)]

    def prepare_data(self) -> None:
        for split in ("train", "val"):
            self.shards(split)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def loader(self, split: str) -> DataLoader:
        """A ``DataLoader`` of this replica's steps of ``split`` (:class:`lightning_bigmac.Microbatches`)."""
        strategy = self.trainer.strategy if self.trainer is not None else None
        replica = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        dp_rank, dp_size = replica.get("rank", 0), replica.get("num_replicas", 1)
        pipeline_size = getattr(strategy, "pipeline_parallel_size", 1)  # BigMacStrategy's P
        balance = balancer_config(self.config, self.model, pipeline_size=pipeline_size)
        train, urls = split == "train", self.shards(split)
        if self.config.reader == "webdataset":
            stream = BalancedStream(
                webdataset_source(urls, seed=self.config.seed, shuffle=train),
                balance,
                describe=partial(_describe_raw, cfg=self.model),
                dp_rank=dp_rank,
                dp_size=dp_size,
            )
            return DataLoader(_Steps(stream, self.model, train), batch_size=None)
        dataset = hf_dataset(urls, os.path.join(self.config.cache_dir, "hf"))
        rows = zip(dataset["__key__"], dataset["json"], strict=True)  # metadata only: no pixels decoded
        descriptors = [describe(key, meta, self.model) for key, meta in rows]
        sampler = BalancedBatchSampler(
            descriptors, balance, dp_rank=dp_rank, dp_size=dp_size, seed=self.config.seed, shuffle=train
        )
        collate = partial(collate_step, cfg=self.model, train=train)
        return DataLoader(StepDataset(_Records(dataset)), batch_sampler=sampler, collate_fn=collate)
