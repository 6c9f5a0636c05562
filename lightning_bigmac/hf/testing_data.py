"""Tiny Hugging Face processors built offline, and media to feed them, for tests and notebooks.

A real checkpoint's processor comes from the hub; these are built from parts in a fraction of a
second with no download: a byte-level BPE tokenizer trained here on a few sentences (with the
family's special tokens and a chat template) and the family's real image processor with small
patch and image sizes, so that a tiny model's vision config can match them.

transformers' ``Qwen2VLVideoProcessor`` needs torchvision, and without torchvision even
``Qwen2VLProcessor`` cannot be built (its class check looks the video processor up through the
torchvision-only registry). :class:`FrameVideoProcessor` stands in for it: every frame goes through
the PIL image processor (the same resize rule and normalisation) and the patches are laid out as
``Qwen2VLVideoProcessor.patchify`` lays them out; :func:`tiny_qwen2_vl_processor` returns a
``Qwen2VLProcessor`` (or ``Qwen2_5_VLProcessor``) subclass whose only change is to accept that
stand-in.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlavaProcessor, PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.image_processing_utils import BatchFeature
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata

__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "QWEN2_VL_CHAT_TEMPLATE",
    "FrameVideoProcessor",
    "random_image",
    "random_video",
    "tiny_llava_processor",
    "tiny_qwen2_vl_processor",
    "tiny_tokenizer",
]

LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""Llava-1.5's layout (``USER: <image>\\n... ASSISTANT: ...``), with the end-of-sequence token after
each reply so that a model learns to stop."""

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL-Instruct's chat template."""

_CORPUS = (
    "What is in this picture? A red square on a blue background, and a green circle.",
    "Describe the video. A ball moves from the left to the right, then it stops.",
    "How many shapes are there? There are three shapes: two squares and one triangle.",
    "You are a helpful assistant. Answer the question about the image in one sentence.",
)
_LLAVA_SPECIALS = ("<pad>", "<s>", "</s>", "<image>")
_QWEN_SPECIALS = (
    *("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"),
    *("<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"),
)


@lru_cache(maxsize=4)
def _trained(specials: tuple[str, ...], vocab_size: int) -> str:
    """A byte-level BPE tokenizer trained on :data:`_CORPUS`, as JSON (training is deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS), trainer)
    return tok.to_str()


def tiny_tokenizer(
    specials: Sequence[str], *, chat_template: str, vocab_size: int = 400, **special_roles: Any
) -> PreTrainedTokenizerFast:
    """A fast tokenizer with ``specials`` as its first ids; ``special_roles`` e.g. ``eos_token="</s>"``."""
    tok = Tokenizer.from_str(_trained(tuple(specials), vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template, **special_roles)


def tiny_llava_processor(
    *, image_size: int = 32, patch_size: int = 8, vision_feature_select_strategy: str = "default"
) -> LlavaProcessor:
    """A ``LlavaProcessor``: CLIP's image processor (resize and center crop to ``image_size``) and a CLS
    token, which the ``"default"`` feature strategy drops: ``(image_size // patch_size) ** 2`` image
    tokens, one more with ``"full"``."""
    tokenizer = tiny_tokenizer(
        _LLAVA_SPECIALS,
        chat_template=LLAVA_CHAT_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


class FrameVideoProcessor(VideoProcessorMixin):
    """Qwen2-VL's video processing without torchvision (see the module docstring).

    Frames are resized by ``smart_resize`` within ``size`` (``shortest_edge`` / ``longest_edge`` in
    pixels), padded to a multiple of ``temporal_patch_size`` by repeating the last frame, and
    ``temporal_patch_size`` consecutive frames share each patch row: ``video_grid_thw`` is
    ``(ceil(frames / temporal_patch_size), height / patch_size, width / patch_size)``.
    Frames are not sampled: every frame given is kept.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, *, min_pixels: int, max_pixels: int):
        super().__init__()
        self.frames = image_processor
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self.do_sample_frames = False

    def preprocess(self, videos: Sequence[Any], return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        """``videos``: each a ``[T, H, W, 3]`` uint8 array or a list of frames."""
        p, tp = self.patch_size, self.temporal_patch_size
        rows, grids, metadata = [], [], []
        for video in videos:
            frames = [np.asarray(f) for f in video]
            metadata.append(VideoMetadata(len(frames), height=frames[0].shape[0], width=frames[0].shape[1]))
            out = self.frames(frames, size=self.size, return_tensors="np")
            _, gh, gw = (int(n) for n in out["image_grid_thw"][0])
            x = out["pixel_values"].reshape(len(frames), gh * gw, -1, tp, p, p)[:, :, :, 0]  # [T, N, C, p, p]
            x = np.concatenate([x, np.repeat(x[-1:], -len(frames) % tp, axis=0)])
            gt = len(x) // tp
            x = x.reshape(gt, tp, *x.shape[1:]).transpose(0, 2, 3, 1, 4, 5)  # [gt, N, C, tp, p, p]
            rows.append(x.reshape(gt * gh * gw, -1))
            grids.append([gt, gh, gw])
        data = {
            "pixel_values_videos": np.concatenate(rows),
            "video_grid_thw": np.asarray(grids, np.int64),
            "video_metadata": metadata,  # no fps: Qwen2.5-VL's processor assumes transformers' default
        }
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["video_metadata"])

    def get_num_of_video_patches(
        self, num_frames: int, height: int, width: int, videos_kwargs: dict | None = None
    ) -> int:
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor, self.size["shortest_edge"], self.size["longest_edge"])
        return -(-num_frames // self.temporal_patch_size) * (h // self.patch_size) * (w // self.patch_size)


class _AcceptsFrameVideos:
    """Accepts a video processor the processor's torchvision-only class lookup cannot find."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, VideoProcessorMixin):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[misc]


class _Qwen2VLProcessor(_AcceptsFrameVideos, Qwen2VLProcessor):
    pass


class _Qwen2_5_VLProcessor(_AcceptsFrameVideos, Qwen2_5_VLProcessor):
    pass


_QWEN_PROCESSORS = {"qwen2-vl": _Qwen2VLProcessor, "qwen2.5-vl": _Qwen2_5_VLProcessor}


def tiny_qwen2_vl_processor(
    family: str = "qwen2-vl",
    *,
    patch_size: int = 4,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_tokens: int = 4,
    max_tokens: int = 64,
    max_video_tokens: int = 32,
) -> Qwen2VLProcessor | Qwen2_5_VLProcessor:
    """A ``Qwen2VLProcessor`` (``family="qwen2.5-vl"``: a ``Qwen2_5_VLProcessor``) with dynamic
    resolution: an image becomes between ``min_tokens`` and ``max_tokens`` LLM tokens (``merge_size**2``
    patches each), a video frame pair at most ``max_video_tokens``. A matching vision config has the
    same ``patch_size``, ``spatial_merge_size`` and ``temporal_patch_size``; a pixel row is
    ``3 * temporal_patch_size * patch_size**2`` values."""
    if family not in _QWEN_PROCESSORS:
        raise ValueError(f"family={family!r}: use one of {', '.join(_QWEN_PROCESSORS)}")
    token_pixels = (patch_size * merge_size) ** 2
    images = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        min_pixels=min_tokens * token_pixels,
        max_pixels=max_tokens * token_pixels,
    )
    video = FrameVideoProcessor(
        images, min_pixels=min_tokens * token_pixels, max_pixels=max_video_tokens * token_pixels
    )
    tokenizer = tiny_tokenizer(
        _QWEN_SPECIALS,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    return _QWEN_PROCESSORS[family](
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=video,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """An RGB image of random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def random_video(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A ``[frames, height, width, 3]`` uint8 video of random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
