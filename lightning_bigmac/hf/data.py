"""Conversations -> balancer descriptors and model inputs, through a Hugging Face processor.

A row is a conversation, as chat templates take it, with its media::

    {"id": "a17",
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
     "images": [<PIL image>], "videos": []}

An ``{"type": "image"}`` item takes its image from the item's own ``"image"`` entry, else the next
one of the row's ``images`` (likewise videos). An image is a PIL image, an ``[H, W, C]`` array, a
path, or ``{"bytes", "path"}`` (a ``datasets`` ``Image(decode=False)`` column, read lazily); a video
an ``[T, H, W, C]`` array or a list of frames.

:meth:`SampleBuilder.describe` gives the balancer a :class:`balancer.Sample` from sizes alone (the
template rendered and tokenized, image headers read, no pixel decoded) whose LLM token count is
exactly the length of the ``input_ids`` :meth:`SampleBuilder.process` later makes: the balancer's
token cap then bounds the real microbatch. Image tokens are the processor's own: Llava's fixed
expansion of ``<image>`` (the crop size over the patch size, the kept CLS token as text), Qwen2-VL's
dynamic resolution (``smart_resize`` within the processor's pixel limits, ``t * h * w /
merge_size**2`` tokens per grid); the image sizes given are the resized ones, so the cost model's
:class:`~balancer.Geometry` (:attr:`SampleBuilder.geometry`) counts the encoder's patches.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from balancer import BalancerConfig, Geometry, Sample, SampleCostModel, StepBatch
from balancer.samples import CorruptSample

from ..batches import Microbatches
from .collate import TOKEN_FIELDS, collate_processed

__all__ = ["SUPPORTED_PROCESSORS", "SampleBuilder"]


class _Vision(NamedTuple):
    """How a processor turns media sizes into sizes the balancer's geometry counts exactly."""

    geometry: Geometry
    image: Callable[[int, int], tuple[int, int]]
    """Input ``(height, width)`` -> the size after the processor's resizing (whole patches)."""
    video: Callable[[int, int], tuple[int, int]] | None
    """A video frame's ``(height, width)`` -> its size after resizing; None: no video support."""
    extra_tokens: int = 0
    """Tokens the processor adds per image beyond the geometry's count (Llava's kept CLS token)."""


def _size(size: Any, name: str) -> int | None:
    return size.get(name) if isinstance(size, Mapping) else getattr(size, name, None)


def _llava(processor: Any) -> _Vision:
    images, p = processor.image_processor, processor.patch_size
    size = images.crop_size if getattr(images, "do_center_crop", False) else images.size
    height, width = _size(size, "height"), _size(size, "width")
    if not height or not width:
        raise ValueError(
            f"a Llava image processor without a fixed output size (size={size}): its image token count "
            "depends on each image; use a center crop or a size with height and width"
        )
    fixed = (height // p * p, width // p * p)  # the processor counts whole patches
    kept = processor.num_additional_image_tokens - (processor.vision_feature_select_strategy == "default")
    return _Vision(Geometry(patch_size=p, merge=1, temporal_patch=1), lambda h, w: fixed, None, kept)


def _qwen2_vl(processor: Any) -> _Vision:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    images = processor.image_processor
    p, m, tp = images.patch_size, images.merge_size, images.temporal_patch_size

    def image(height: int, width: int) -> tuple[int, int]:
        return smart_resize(
            height, width, p * m, _size(images.size, "shortest_edge"), _size(images.size, "longest_edge")
        )

    videos = getattr(processor, "video_processor", None)
    if videos is None:
        return _Vision(Geometry(patch_size=p, merge=m, temporal_patch=tp), image, None)
    if (videos.patch_size, videos.merge_size) != (p, m):
        raise ValueError(
            f"the video processor's patch_size={videos.patch_size}, merge_size={videos.merge_size} differ "
            f"from the image processor's ({p}, {m}): one geometry cannot count both"
        )
    for flag in ("do_sample_frames", "cap_pixels_per_frame"):
        if getattr(videos, flag, None):
            raise ValueError(
                f"the video processor has {flag}=True, which makes a video's tokens depend on more than its "
                f"frame size; set {flag}=False (sample frames before building the rows)"
            )

    def video(height: int, width: int) -> tuple[int, int]:
        size = videos.size
        return smart_resize(height, width, p * m, _size(size, "shortest_edge"), _size(size, "longest_edge"))

    return _Vision(Geometry(patch_size=p, merge=m, temporal_patch=videos.temporal_patch_size), image, video)


_FAMILIES = {"LlavaProcessor": _llava, "Qwen2VLProcessor": _qwen2_vl, "Qwen2_5_VLProcessor": _qwen2_vl}
SUPPORTED_PROCESSORS = tuple(_FAMILIES)
"""Processor classes (or their subclasses) whose image token counts :class:`SampleBuilder` knows."""


def _vision(processor: Any) -> _Vision:
    for cls in type(processor).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__](processor)
    raise TypeError(
        f"SampleBuilder does not know how {type(processor).__name__} counts image tokens; supported: "
        f"{', '.join(SUPPORTED_PROCESSORS)}"
    )


# ---- media -------------------------------------------------------------------------------------
def _open(image: Any) -> Image.Image:
    """A lazily read PIL image (only the header until pixels are asked for)."""
    if isinstance(image, Mapping):
        data = image.get("bytes")
        return Image.open(io.BytesIO(data)) if data is not None else Image.open(image["path"])
    return Image.open(image)


def _image_hw(image: Any) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, (str, os.PathLike, Mapping)):
        with _open(image) as opened:
            return opened.height, opened.width
    shape = np.shape(image)
    return int(shape[0]), int(shape[1])


def _video_thw(video: Any) -> tuple[int, int, int]:
    if hasattr(video, "shape"):
        return int(video.shape[0]), int(video.shape[1]), int(video.shape[2])
    return (len(video), *_image_hw(video[0]))


def _pixels(image: Any) -> Any:
    if isinstance(image, (str, os.PathLike, Mapping)):
        with _open(image) as opened:
            return opened.convert("RGB")
    return image


def _frames(video: Any) -> np.ndarray:
    return np.asarray(video) if hasattr(video, "shape") else np.stack([np.asarray(_pixels(f)) for f in video])


class SampleBuilder:
    """Rows of conversations -> balancer descriptors, processed samples and collated microbatches.

    ``processor`` is a processor of :data:`SUPPORTED_PROCESSORS` with a chat template; ``messages``,
    ``images``, ``videos`` and ``key`` name the row's fields. Labels cover the assistant replies
    (their text and end-of-turn token, as the template renders them) and are -100 elsewhere: the
    prompt, the template's scaffolding and every image and video token. Replies are located by
    rendering the conversation up to each reply, so the template must render a conversation's
    beginning as a prefix of the whole (Llava's and Qwen2-VL's do; a template that rewrites earlier
    turns is refused with a ``ValueError``).
    """

    def __init__(
        self,
        processor: Any,
        *,
        messages: str = "messages",
        images: str = "images",
        videos: str = "videos",
        key: str = "id",
    ):
        self._vision = _vision(processor)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.fields = {"messages": messages, "image": images, "video": videos, "key": key}
        self._placeholders = {"image": processor.image_token_id}
        if self._vision.video is not None:
            self._placeholders["video"] = processor.video_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token to pad with")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> SampleBuilder:
        """A builder around ``AutoProcessor.from_pretrained(name_or_path)``; ``kwargs`` name row fields."""
        from transformers import AutoProcessor

        return cls(AutoProcessor.from_pretrained(name_or_path), **kwargs)

    @property
    def geometry(self) -> Geometry:
        """Patch, merge and temporal sizes under which the descriptors' sizes give the processor's counts."""
        return self._vision.geometry

    def cost_model(self, **kwargs: Any) -> SampleCostModel:
        """The balancer's cost model for these samples: this geometry, and attention within each sample
        (each is its own row of the padded batch). ``kwargs`` go to :class:`~balancer.SampleCostModel`."""
        return SampleCostModel(**{"geometry": self.geometry, "llm_attention": "sample", **kwargs})

    def balancer_config(self, **kwargs: Any) -> BalancerConfig:
        """``BalancerConfig(**kwargs)`` with :meth:`cost_model` unless ``kwargs`` give one."""
        return BalancerConfig(**{"cost_model": self.cost_model(), **kwargs})

    # ---- a row's parts -----------------------------------------------------------------------
    def _parts(self, row: Mapping[str, Any], key: str) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
        """The row's messages cleaned for the template (None entries dropped, as ``datasets`` fills
        absent struct fields with None) and its images and videos in placeholder order."""
        pools = {kind: list(row.get(self.fields[kind]) or ()) for kind in ("image", "video")}
        taken = {"image": 0, "video": 0}
        media: dict[str, list[Any]] = {"image": [], "video": []}
        messages = []
        for message in row[self.fields["messages"]]:
            content = message["content"]
            if not isinstance(content, str):
                content = [{k: v for k, v in item.items() if v is not None} for item in content]
                for item in content:
                    kind = item.get("type")
                    if kind not in media:
                        continue
                    if kind in item:
                        media[kind].append(item[kind])
                    elif taken[kind] < len(pools[kind]):
                        media[kind].append(pools[kind][taken[kind]])
                        taken[kind] += 1
                    else:
                        raise CorruptSample(key, f"more {kind} items than entries in {self.fields[kind]!r}")
            messages.append({**{k: v for k, v in message.items() if v is not None}, "content": content})
        for kind, n in taken.items():
            if n != len(pools[kind]):
                raise CorruptSample(
                    key, f"{len(pools[kind])} {self.fields[kind]} but {n} {kind} items take one"
                )
        if media["video"] and self._vision.video is None:
            raise CorruptSample(key, f"{type(self.processor).__name__} takes no videos")
        return messages, media

    def _key(self, row: Mapping[str, Any], key: str | None) -> str:
        return key if key is not None else str(row.get(self.fields["key"], "?"))

    def _render(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        return self.processor.apply_chat_template(list(messages), tokenize=False, **kwargs)

    def _special(self, text: str) -> bool:
        """Whether tokenizing adds special tokens: not when the template wrote the BOS (HF's rule)."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def _tokenize(self, text: str, **kwargs: Any) -> Any:
        return self.tokenizer(text, add_special_tokens=self._special(text), **kwargs)

    # ---- the balancer's view -----------------------------------------------------------------
    def describe(self, row: Mapping[str, Any], key: str | None = None) -> Sample:
        """The row's descriptor, from sizes (no pixel decoded); ``key`` defaults to the row's key field.

        A row whose media do not match its placeholders, or whose image cannot be read, raises
        :class:`~balancer.CorruptSample`: the balancer's adapters skip and count it.
        """
        key = self._key(row, key)
        messages, media = self._parts(row, key)
        ids = self._tokenize(self._render(messages))["input_ids"]
        placeholders = {kind: ids.count(token) for kind, token in self._placeholders.items()}
        for kind, n in placeholders.items():
            if n != len(media[kind]):
                raise CorruptSample(
                    key, f"the template wrote {n} {kind} placeholders for {len(media[kind])} {kind}s"
                )
        vision = self._vision
        try:
            images = tuple(vision.image(*_image_hw(image)) for image in media["image"])
            videos = tuple((t, *vision.video(h, w)) for t, h, w in map(_video_thw, media["video"]))
        except (OSError, ValueError) as err:
            raise CorruptSample(key, f"unreadable media: {err}") from err
        text = len(ids) - sum(placeholders.values()) + vision.extra_tokens * len(images)
        return Sample(key=key, text_tokens=text, images=images, videos=videos)

    def describe_all(self, rows: Iterable[Mapping[str, Any]]) -> list[Sample]:
        """Descriptors of a map-style dataset's rows, in order (for :class:`~balancer.BalancedBatchSampler`);
        a row without a key field is keyed by its index. A ``datasets`` image column cast to
        ``Image(decode=False)`` is read from its headers only."""
        return [
            self.describe(row, None if self.fields["key"] in row else str(i)) for i, row in enumerate(rows)
        ]

    # ---- model inputs ------------------------------------------------------------------------
    def _assistant_spans(self, messages: Sequence[Mapping[str, Any]], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant replies in ``text``: from the end of the conversation
        rendered up to the reply with a generation prompt, to the end of it rendered with the reply."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self._render(messages[:i], add_generation_prompt=True)
            turn = self._render(messages[: i + 1]).rstrip()
            if not (turn.startswith(head) and text.startswith(turn)):
                raise ValueError(
                    f"the chat template does not render the conversation up to message {i} as a prefix of "
                    "the whole, so the reply's tokens cannot be located; use one that renders turns in order"
                )
            spans.append((len(head), len(turn)))
        return spans

    def _labels(self, plain: Any, spans: Sequence[tuple[int, int]], ids: torch.Tensor) -> torch.Tensor:
        """``ids`` where a token of an assistant reply, -100 elsewhere. ``plain`` is the template's
        text tokenized with one placeholder per image; the processor's ``ids`` must equal it outside
        the expanded placeholders, which is checked."""
        short = np.asarray(plain["input_ids"])
        offsets = np.asarray(plain["offset_mapping"]).reshape(-1, 2)
        reply = np.zeros(len(short), bool)
        for start, end in spans:
            reply |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        long = ids.numpy()
        marks = list(self._placeholders.values())
        text_short, text_long = ~np.isin(short, marks), np.flatnonzero(~np.isin(long, marks))
        if not np.array_equal(short[text_short], long[text_long]):
            raise RuntimeError(
                "the processor's input_ids differ from the template's text beyond the image and video "
                "placeholders; the builder cannot align labels for this processor"
            )
        labels = np.full(len(long), -100, np.int64)
        scored = text_long[reply[text_short]]
        labels[scored] = long[scored]
        return torch.from_numpy(labels)

    def process(self, row: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One row as model inputs, unpadded: ``input_ids``, ``attention_mask``, ``labels`` (and
        ``mm_token_type_ids``) of shape ``[L]``, and the processor's vision fields."""
        key = self._key(row, None)
        messages, media = self._parts(row, key)
        text = self._render(messages)
        spans = self._assistant_spans(messages, text)
        plain = self._tokenize(text, return_offsets_mapping=True)
        out = self.processor(
            text=[text],
            images=[_pixels(image) for image in media["image"]] or None,
            videos=[_frames(video) for video in media["video"]] or None,
            add_special_tokens=self._special(text),
            return_tensors="pt",
        )
        sample = {name: out[name][0] for name in TOKEN_FIELDS if name in out}
        sample["labels"] = self._labels(plain, spans, sample["input_ids"])
        sample.update({name: value for name, value in out.items() if name not in TOKEN_FIELDS})
        return sample

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """One microbatch of ``rows`` (format in :mod:`lightning_bigmac.hf.collate`)."""
        return collate_processed([self.process(row) for row in rows], self.pad_token_id)

    def collate_step(self, step: StepBatch) -> Microbatches:
        """A balancer step of rows -> the microbatches and owners the strategy consumes.

        Every sample's processed length is checked against its descriptor's token count: a sample
        the balancer truncated (``oversize="truncate"``) or described otherwise raises, naming its key.
        """
        count = SampleCostModel(geometry=self.geometry)
        microbatches = []
        for rows, samples in zip(step.microbatches, step.samples, strict=True):
            processed = [self.process(row) for row in rows]
            for done, sample in zip(processed, samples, strict=True):
                planned = count.spans(sample).llm_tokens
                if len(done["input_ids"]) != planned:
                    raise ValueError(
                        f"sample {sample.key!r} has {len(done['input_ids'])} tokens but the balancer planned "
                        f"{planned}: describe rows with this builder, and use oversize='error' or 'skip'"
                    )
            microbatches.append(collate_processed(processed, self.pad_token_id))
        return Microbatches(microbatches, list(step.owners), state=dict(step.state))
