"""Where samples come from: a synthetic world of shapes and scikit-image's bundled photographs.

Every source yields :class:`Record` s, one per sample, deterministically from ``(seed, split,
index)``, so a cache can be rebuilt bit for bit. Each task is a question with a small answer set
(``choices`` answers are possible, so chance accuracy is ``1 / choices``), a caption, or an image
to draw. The mix is heterogeneous on purpose, as the balancer's real inputs are: images of varied
size and aspect ratio, several images per sample, short videos, text-only samples and
image-generation targets. Sizes are multiples of 16 pixels, whole LLM tokens at the default
geometry (8-pixel patches merged 2 x 2).

=========  ==================  ===========================================================  =======
source     kind                sample                                                       choices
=========  ==================  ===========================================================  =======
shapes     ``colour``          1-3 shapes; "what colour is the square ?" -> red             6
shapes     ``shape``           1-3 shapes; "what shape is red ?" -> circle                  3
shapes     ``count``           1-4 shapes; "how many shapes are there ?" -> three           4
shapes     ``caption``         1 shape; "describe the image" -> a red circle                --
shapes     ``more``            2 images; "which image has more shapes ?" -> second          2
shapes     ``same``            2 images; "are the shapes the same colour ?" -> yes          2
shapes     ``motion``          video of 3-6 frames; "which way does the red circle move ?"  4
shapes     ``after``           text only; "what comes after four ?" -> five                 10
shapes     ``draw``            text -> a 16 or 32 pixel image of "a red circle"             --
photos     ``photo``           a crop of a photo; "what is in the photo ?" -> cat           14
photos     ``pair``            2 crops; "are these the same photo ?" -> no                  2
photos     ``pan``             video panning over a photo; "which way does the camera ..."  2
photos     ``draw``            text -> a 16 or 32 pixel thumbnail of "the cat"              --
layout     ``where``           1 shape in one half; "where is the red circle ?" -> left     4
=========  ==================  ===========================================================  =======

``layout`` is not part of the default mix: it is the *new task* of the fine-tuning notebook
(``examples/finetune.ipynb``), a question the main job's model has never seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["COLOURS", "DIRECTIONS", "NUMBERS", "PHOTOS", "SHAPES", "SOURCES", "Record", "records"]

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 220, 40),
    "white": (240, 240, 240),
    "purple": (170, 60, 210),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
PHOTOS = {  # answer word -> scikit-image loader name (all ship inside the scikit-image wheel)
    "astronaut": "astronaut",
    "man": "camera",
    "cat": "chelsea",
    "coffee": "coffee",
    "coins": "coins",
    "rocket": "rocket",
    "moon": "moon",
    "stars": "hubble_deep_field",
    "eye": "retina",
    "grass": "grass",
    "stones": "gravel",
    "wall": "brick",
    "clock": "clock",
    "text": "page",
}
_SPLITS = {"train": 0, "val": 1}


@dataclass
class Record:
    """One sample before tokenisation: its text and pixels (uint8 RGB, ``[H, W, 3]``)."""

    key: str
    """Unique within a split (``shapes-train-000042``); also the webdataset key."""
    meta: dict[str, Any]
    """``kind``, ``prompt``, ``answer`` (the text target; empty for drawing) and ``choices`` (number
    of possible answers; 0 for captions and drawing, which are not scored)."""
    images: list[np.ndarray] = field(default_factory=list)
    """Input images ``[H, W, 3]``."""
    videos: list[np.ndarray] = field(default_factory=list)
    """Input videos ``[T, H, W, 3]``."""
    outputs: list[np.ndarray] = field(default_factory=list)
    """Images the generator should produce ``[H, W, 3]``."""


def _rng(seed: int, source: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, sum(map(ord, source)), _SPLITS[split], index])


def _size(rng: np.random.Generator, low: int = 32, high: int = 64) -> tuple[int, int]:
    """A random ``(height, width)`` in multiples of 16 pixels, each side in ``[low, high]``."""
    h, w = rng.integers(low // 16, high // 16 + 1, size=2) * 16
    return int(h), int(w)


# ---- shapes ------------------------------------------------------------------------------------
def _canvas(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A dark, slightly noisy background, so that flat colour is the signal and not the whole image."""
    base = rng.integers(0, 40, size=3)
    return np.clip(base + rng.integers(0, 25, size=(h, w, 1)), 0, 255).astype(np.uint8)  # [H, W, 3]


def _draw(img: np.ndarray, shape: str, colour: str, cy: float, cx: float, r: float) -> None:
    """Paint one shape of radius ``r`` centred at ``(cy, cx)`` into ``img`` in place."""
    y, x = np.mgrid[: img.shape[0], : img.shape[1]] + 0.5
    if shape == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(y - cy) <= 0.85 * r) & (np.abs(x - cx) <= 0.85 * r)
    else:  # triangle, apex up
        mask = (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    img[mask] = COLOURS[colour]


def _scene(
    rng: np.random.Generator, objects: list[tuple[str, str]], size: tuple[int, int], radius: float = 8
) -> np.ndarray:
    """An image with ``objects`` (shape, colour) of radius ``radius`` to ``radius + 3`` pixels, placed
    without overlap (best effort for crowded ones). Shapes span 2-3 patches: smaller ones are hard
    to tell apart for a small ViT with 8-pixel patches."""
    h, w = size
    img = _canvas(rng, h, w)
    placed: list[tuple[float, float, float]] = []
    for shape, colour in objects:
        r = min(float(rng.uniform(radius, radius + 3)), min(h, w) / 2 - 1)
        for _ in range(50):
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
            if all((cy - py) ** 2 + (cx - px) ** 2 > (r + pr + 1) ** 2 for py, px, pr in placed):
                break
        placed.append((cy, cx, r))
        _draw(img, shape, colour, cy, cx, r)
    return img


def _objects(rng: np.random.Generator, n: int, *, distinct: str = "") -> list[tuple[str, str]]:
    """``n`` (shape, colour) pairs; ``distinct="shape"``/``"colour"`` makes that attribute unique."""
    shapes = list(rng.permutation(SHAPES)[:n]) if distinct == "shape" else list(rng.choice(SHAPES, n))
    names = list(COLOURS)
    colours = list(rng.permutation(names)[:n]) if distinct == "colour" else list(rng.choice(names, n))
    return [(str(s), str(c)) for s, c in zip(shapes, colours, strict=True)]


def _qa(key: str, kind: str, prompt: str, answer: str, choices: int, **pixels: Any) -> Record:
    return Record(key, {"kind": kind, "prompt": prompt, "answer": answer, "choices": choices}, **pixels)


def _motion_video(rng: np.random.Generator) -> tuple[np.ndarray, str, str, str]:
    """A shape crossing the frame: ``([T, H, W, 3], direction, shape, colour)``."""
    (shape, colour), frames = _objects(rng, 1)[0], int(rng.integers(3, 7))
    h, w = _size(rng, 32, 48)
    direction = str(rng.choice(list(DIRECTIONS)))
    dy, dx = DIRECTIONS[direction]
    r = 6.0
    extent = h if dy else w  # the shape must stay inside the frame along its motion
    step = min(float(rng.uniform(3, 5)), (extent - 2 * r) / (frames - 1))
    span = (frames - 1) * step

    def start(d: int, extent: int) -> float:
        """A start coordinate that keeps the shape inside ``[0, extent)`` for the whole motion."""
        if d == 0:
            return float(rng.uniform(r, extent - r))
        return (r + span if d < 0 else r) + float(rng.uniform(0, extent - 2 * r - span))

    cy, cx = start(dy, h), start(dx, w)
    background = _canvas(rng, h, w)
    video = np.stack([background.copy() for _ in range(frames)])  # [T, H, W, 3]
    for t in range(frames):
        _draw(video[t], shape, colour, cy + dy * step * t, cx + dx * step * t, r)
    return video, direction, shape, colour


def _drawing(shape: str, colour: str, side: int) -> np.ndarray:
    """The canonical picture of "a <colour> <shape>": black, centred, filling most of the frame."""
    img = np.zeros((side, side, 3), np.uint8)
    _draw(img, shape, colour, side / 2, side / 2, side * 0.38)
    return img


def shapes_record(seed: int, split: str, index: int) -> Record:
    """Sample ``index`` of the shapes world's ``split``."""
    rng = _rng(seed, "shapes", split, index)
    key = f"shapes-{split}-{index:06d}"
    kind = str(rng.choice(["colour", "shape", "count", "caption", "more", "same", "motion", "after", "draw"],
                          p=[0.14, 0.14, 0.14, 0.08, 0.08, 0.08, 0.14, 0.10, 0.10]))  # fmt: skip
    if kind == "colour":
        objects = _objects(rng, int(rng.integers(1, 4)), distinct="shape")
        shape, colour = objects[int(rng.integers(len(objects)))]
        img = _scene(rng, objects, _size(rng, 48, 64))
        return _qa(key, kind, f"what colour is the {shape} ?", colour, len(COLOURS), images=[img])
    if kind == "shape":
        objects = _objects(rng, int(rng.integers(1, 4)), distinct="colour")
        shape, colour = objects[int(rng.integers(len(objects)))]
        img = _scene(rng, objects, _size(rng, 48, 64))
        return _qa(key, kind, f"what shape is {colour} ?", shape, len(SHAPES), images=[img])
    if kind == "count":
        n = int(rng.integers(1, 5))
        img = _scene(rng, _objects(rng, n), _size(rng, 48, 64), radius=6)  # room for four
        return _qa(key, kind, "how many shapes are there ?", NUMBERS[n], 4, images=[img])
    if kind == "caption":
        (shape, colour) = _objects(rng, 1)[0]
        img = _scene(rng, [(shape, colour)], _size(rng, 16, 48))
        return _qa(key, kind, "describe the image", f"a {colour} {shape}", 0, images=[img])
    if kind == "more":
        a, b = rng.choice(np.arange(1, 5), 2, replace=False)
        imgs = [_scene(rng, _objects(rng, int(n)), _size(rng, 32, 48), radius=5) for n in (a, b)]
        return _qa(key, kind, "which image has more shapes ?", "first" if a > b else "second", 2, images=imgs)
    if kind == "same":
        same = bool(rng.integers(2))
        first = _objects(rng, 1)[0]
        second = (str(rng.choice(SHAPES)), first[1]) if same else _objects(rng, 2, distinct="colour")[1]
        if not same and second[1] == first[1]:
            second = (second[0], next(c for c in COLOURS if c != first[1]))
        imgs = [_scene(rng, [obj], _size(rng, 16, 32)) for obj in (first, second)]
        return _qa(key, kind, "are the shapes the same colour ?", "yes" if same else "no", 2, images=imgs)
    if kind == "motion":
        video, direction, shape, colour = _motion_video(rng)
        prompt = f"which way does the {colour} {shape} move ?"
        return _qa(key, kind, prompt, direction, len(DIRECTIONS), videos=[video])
    if kind == "after":
        n = int(rng.integers(0, 10))
        return _qa(key, kind, f"what comes after {NUMBERS[n]} ?", NUMBERS[n + 1], 10)
    shape, colour = _objects(rng, 1)[0]  # draw
    side = int(rng.choice([16, 32]))
    return _qa(key, kind, f"draw a {colour} {shape}", "", 0, outputs=[_drawing(shape, colour, side)])


# ---- photos ------------------------------------------------------------------------------------
@cache
def _photo(name: str) -> np.ndarray:
    """A bundled photograph as ``[H, W, 3]`` uint8, shrunk so its short side is 128 pixels (loaded once)."""
    from skimage import data  # scikit-image: only the photo source needs it

    img = np.asarray(getattr(data, PHOTOS[name])())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    pil = Image.fromarray(img.astype(np.uint8))
    scale = 128 / min(pil.size)
    return np.asarray(pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR))


def _crop(rng: np.random.Generator, name: str, size: tuple[int, int]) -> np.ndarray:
    """A random crop (60-100% of each side, random horizontal flip) of a photo, resized to ``size``."""
    photo = _photo(name)
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = Image.fromarray(photo[y : y + ch, x : x + cw]).resize(size[::-1], Image.BILINEAR)
    return np.asarray(out)[:, ::-1].copy() if rng.integers(2) else np.asarray(out)


def _pan(rng: np.random.Generator, name: str) -> tuple[np.ndarray, str]:
    """A video of a window sliding across a photo: ``([T, H, W, 3], "left" | "right")``."""
    frames, (h, w) = int(rng.integers(3, 6)), _size(rng, 32, 48)
    wide = np.asarray(Image.fromarray(_photo(name)).resize((2 * w, h), Image.BILINEAR))  # [H, 2W, 3]
    starts = np.linspace(0, w, frames).round().astype(int)
    direction = str(rng.choice(["left", "right"]))
    if direction == "left":  # the camera moves left: the window slides towards x = 0
        starts = starts[::-1]
    return np.stack([wide[:, s : s + w] for s in starts]), direction  # [T, H, W, 3]


def photo_record(seed: int, split: str, index: int) -> Record:
    """Sample ``index`` of the photo source's ``split``: tasks over crops of real photographs."""
    rng = _rng(seed, "photos", split, index)
    key = f"photos-{split}-{index:06d}"
    names = list(PHOTOS)
    name = names[int(rng.integers(len(names)))]
    kind = str(rng.choice(["photo", "pair", "pan", "draw"], p=[0.5, 0.2, 0.2, 0.1]))
    if kind == "photo":
        img = _crop(rng, name, _size(rng, 32, 64))
        return _qa(key, kind, "what is in the photo ?", name, len(PHOTOS), images=[img])
    if kind == "pair":
        same = bool(rng.integers(2))
        other = name if same else names[(names.index(name) + int(rng.integers(1, len(names)))) % len(names)]
        imgs = [_crop(rng, n, _size(rng, 32, 48)) for n in (name, other)]
        return _qa(key, kind, "are these the same photo ?", "yes" if same else "no", 2, images=imgs)
    if kind == "pan":
        video, direction = _pan(rng, name)
        return _qa(key, kind, "which way does the camera move ?", direction, 2, videos=[video])
    side = int(rng.choice([16, 32]))
    return _qa(key, kind, f"draw the {name}", "", 0, outputs=[_crop(rng, name, (side, side))])


# ---- layout ------------------------------------------------------------------------------------
def layout_record(seed: int, split: str, index: int) -> Record:
    """Sample ``index`` of the layout source: which half of the image one shape sits in.

    The shape is centred a quarter of the image from the middle towards ``left``/``right``/``up``/
    ``down`` and jittered along the other axis, so the answer is never ambiguous.
    """
    rng = _rng(seed, "layout", split, index)
    key = f"layout-{split}-{index:06d}"
    h, w = _size(rng, 48, 64)
    img = _canvas(rng, h, w)
    shape, colour = _objects(rng, 1)[0]
    side = str(rng.choice(list(DIRECTIONS)))
    dy, dx = DIRECTIONS[side]
    cy = h / 2 + dy * h / 4 + (0 if dy else rng.uniform(-h / 8, h / 8))
    cx = w / 2 + dx * w / 4 + (0 if dx else rng.uniform(-w / 8, w / 8))
    _draw(img, shape, colour, cy, cx, r=min(h, w) / 6)
    return _qa(key, "where", f"where is the {colour} {shape} ?", side, len(DIRECTIONS), images=[img])


SOURCES: dict[str, Callable[[int, str, int], Record]] = {
    "shapes": shapes_record,
    "photos": photo_record,
    "layout": layout_record,
}
"""Source name -> ``record(seed, split, index)``."""


def records(source: str, seed: int, split: str, count: int) -> Iterator[Record]:
    """The first ``count`` records of ``source``'s ``split``."""
    make = SOURCES[source]
    return (make(seed, split, i) for i in range(count))
