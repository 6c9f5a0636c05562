"""How a sample becomes a microbatch: its token layout, its balancer descriptor, and the packed tensors.

:func:`describe` turns a record's metadata into the balancer's :class:`balancer.Sample` (sizes only,
no pixels); the balancer packs samples into the microbatches of each step under a token cap, and
:func:`collate` makes one microbatch, one packed sequence of several samples, a dict of tensors::

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
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from balancer import BalancerConfig, Geometry, Sample, SampleCostModel, StepBatch
from lightning_bigmac import Microbatches

from .config import DataConfig, ModelConfig
from .sources import Record
from .tokens import BOS, EOS, GEN, IMAGE, IMG, SEP, VIDEO, encode

__all__ = [
    "balancer_config",
    "collate",
    "collate_step",
    "describe",
    "metadata_with_sizes",
    "patchify",
    "unpatchify",
]


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


# ---- a sample's sequence and descriptor ----------------------------------------------------------
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


# ---- microbatches --------------------------------------------------------------------------------
def collate(samples: Sequence[Record], cfg: ModelConfig, *, seed: int = 0) -> dict[str, Any]:
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
        [collate(mb, cfg, seed=seed) for mb in step.microbatches], list(step.owners), state=dict(step.state)
    )


def balancer_config(data: DataConfig, model: ModelConfig, *, pipeline_size: int = 1) -> BalancerConfig:
    """How the balancer packs this example: its geometry and document-masked (per-sample) attention."""
    p = model.patch_size
    geometry = Geometry(patch_size=p, merge=model.merge, temporal_patch=1, latent_patch=p)
    return BalancerConfig(
        pipeline_size=pipeline_size,
        microbatches=data.microbatches,
        token_cap=data.token_cap,
        cost_model=SampleCostModel(geometry=geometry, llm_attention="sample"),
    )
