"""Conversations through real (tiny, offline) HF processors: the balancer's token counts are the
collated lengths, labels cover the replies only, packed microbatches respect the token cap."""

from __future__ import annotations

import datasets
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from balancer import BalancedBatchSampler, CorruptSample, StepDataset
from lightning_bigmac.hf.data import SampleBuilder
from lightning_bigmac.hf.testing_data import (
    random_image,
    random_video,
    tiny_llava_processor,
    tiny_qwen2_vl_processor,
)


def _user(*items):
    return {"role": "user", "content": list(items)}


def _reply(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _text(text):
    return {"type": "text", "text": text}


IMAGE, VIDEO = {"type": "image"}, {"type": "video"}


def _rows(videos: bool) -> list[dict]:
    """Text only, one image, two images inline and from the row, multi-turn; Qwen2-VL also a video."""
    rows = [
        {"id": "text", "messages": [_user(_text("Say yes.")), _reply("Yes.")]},
        {
            "id": "one",
            "messages": [_user(IMAGE, _text("What is in this picture?")), _reply("A red square.")],
            "images": [random_image(30, 50, seed=1)],
        },
        {
            "id": "two",
            "messages": [
                _user({"type": "image", "image": random_image(300, 90, seed=2)}, IMAGE, _text("How many?")),
                _reply("Three shapes."),
                _user(_text("Which colour?")),
                _reply("Green."),
            ],
            "images": [random_image(17, 17, seed=3)],
        },
    ]
    if videos:
        messages = [_user(VIDEO, _text("Describe the video.")), _reply("A ball moves."), _user(IMAGE)]
        rows.append(
            {
                "id": "video",
                "messages": [*messages, _reply("It stops.")],
                "videos": [random_video(5, 40, 60, seed=4)],
                "images": [random_image(64, 40, seed=5)],
            }
        )
    return rows


def _vision_ids(builder):
    """The processor's image (and video) placeholder token ids."""
    p = builder.processor
    return torch.tensor([p.image_token_id, getattr(p, "video_token_id", p.image_token_id)])


@pytest.fixture(scope="module")
def llava():
    return SampleBuilder(tiny_llava_processor())


@pytest.fixture(scope="module")
def qwen():
    return SampleBuilder(tiny_qwen2_vl_processor())


def test_token_counts_are_the_processed_lengths(llava, qwen):
    full = SampleBuilder(tiny_llava_processor(vision_feature_select_strategy="full"))  # keeps the CLS token
    qwen25 = SampleBuilder(tiny_qwen2_vl_processor("qwen2.5-vl"))
    for builder, rows in (
        (llava, _rows(False)),
        (full, _rows(False)),
        (qwen, _rows(True)),
        (qwen25, _rows(True)),
    ):
        model = builder.cost_model()
        for row in rows:
            sample, done = builder.describe(row), builder.process(row)
            spans = model.spans(sample)
            assert spans.llm_tokens == len(done["input_ids"]) == len(done["labels"]), row["id"]
            if builder in (llava, full):
                assert spans.encoder == (16,) * len(done.get("pixel_values", ())), row["id"]  # (32 / 8)**2
                continue
            grids = [done[k] for k in ("image_grid_thw", "video_grid_thw") if k in done]
            patches = sum(int(g.prod(-1).sum()) for g in grids)
            assert sum(spans.encoder) == patches, row["id"]
            vision = torch.isin(done["input_ids"], _vision_ids(builder))
            assert int(vision.sum()) == patches // 4, row["id"]
    # dynamic resolution: 30x50 -> 32x48, 300x90 capped at 64 tokens -> 112x32, 17x17 -> 16x16
    assert qwen.describe(_rows(True)[2]).images == ((112, 32), (16, 16))
    assert qwen.describe(_rows(True)[3]).videos == ((5, 32, 48),)  # 5 frames: 3 slices of 24 tokens


def test_labels_are_the_assistant_replies(llava, qwen):
    for builder, row, replies in (
        (llava, _rows(False)[2], " Three shapes.</s> Green.</s>"),
        (qwen, _rows(True)[3], "A ball moves.<|im_end|>It stops.<|im_end|>"),
    ):
        done = builder.process(row)
        ids, labels = done["input_ids"], done["labels"]
        scored = labels != -100
        assert torch.equal(labels[scored], ids[scored])
        assert builder.tokenizer.decode(ids[scored]) == replies
        assert not scored[torch.isin(ids, _vision_ids(builder))].any()
        assert not scored[: len(ids) // 3].any()  # the prompt comes first


def test_collate_pads_tokens_and_concatenates_pixels(llava, qwen):
    rows = _rows(True)
    batch = qwen.collate(rows)
    lengths = [len(qwen.process(row)["input_ids"]) for row in rows]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape
    assert batch["input_ids"].shape == (len(rows), max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    padding = batch["attention_mask"] == 0
    assert (batch["input_ids"][padding] == qwen.pad_token_id).all() and (
        batch["labels"][padding] == -100
    ).all()
    assert batch["pixel_values"].shape == (int(batch["image_grid_thw"].prod(-1).sum()), 3 * 2 * 4 * 4)
    assert batch["pixel_values_videos"].shape[0] == int(batch["video_grid_thw"].prod(-1).sum())
    assert batch["image_grid_thw"].shape == (4, 3) and batch["video_grid_thw"].tolist() == [[3, 8, 12]]
    assert int((batch["mm_token_type_ids"] == 1).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4

    assert llava.collate(_rows(False))["pixel_values"].shape == (3, 3, 32, 32)
    assert "pixel_values" not in llava.collate(_rows(False)[:1])  # text only, as the processor leaves it


def _matching_model(builder):
    """A tiny random HF model whose vocabulary, special ids and vision geometry fit the processor."""
    p, tok = builder.processor, builder.tokenizer
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    text.update(vocab_size=len(tok), num_hidden_layers=1, bos_token_id=None, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    if isinstance(p.image_processor, CLIPImageProcessorPil):
        vision = CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        config = LlavaConfig(
            vision_config=vision, text_config=LlamaConfig(**text), image_token_id=p.image_token_id
        )
        return LlavaForConditionalGeneration(config)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = dict(depth=1, num_heads=2, patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
    vision.update(embed_dim=16, hidden_size=32, mlp_ratio=2)
    ids = dict(image_token_id=p.image_token_id, video_token_id=p.video_token_id)
    ids["vision_start_token_id"] = tok.convert_tokens_to_ids("<|vision_start|>")
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))


def _summed_loss(model, batch):
    """HF's loss is a mean over the shifted labels; times their count it is a sum over targets."""
    return model(**batch).loss * (batch["labels"][:, 1:] != -100).sum()


def test_a_collated_microbatch_scores_like_its_samples_alone(llava, qwen):
    """Padding, masks, M-RoPE positions and the order of concatenated pixels are right when a padded
    microbatch's summed loss is the sum of its samples' losses computed one at a time."""
    for builder, rows in ((llava, _rows(False)), (qwen, _rows(True))):
        model = _matching_model(builder)
        together = _summed_loss(model, builder.collate(rows))
        alone = sum(_summed_loss(model, builder.collate([row])) for row in rows)
        assert torch.isfinite(together) and torch.allclose(together, alone, rtol=1e-5)


def test_balancer_steps_from_a_datasets_table_respect_the_token_cap(qwen):
    rows = [{"images": [], **row, "id": f"{row['id']}{i}"} for i in range(6) for row in _rows(True)[:3]]
    table = datasets.Dataset.from_list(rows).cast_column(
        "images", datasets.Sequence(datasets.Image(decode=False))
    )
    descriptors = qwen.describe_all(table)
    assert [d.key for d in descriptors] == [r["id"] for r in rows]
    config = qwen.balancer_config(pipeline_size=2, microbatches=4, token_cap=260)
    sampler = BalancedBatchSampler(descriptors, config, seed=0)
    loader = DataLoader(StepDataset(table), batch_sampler=sampler, collate_fn=qwen.collate_step)
    steps, seen = list(loader), 0
    assert len(steps) == len(sampler) >= 2
    for step in steps:
        assert len(step.microbatches) == 4 and sorted(step.owners[:2]) == sorted(step.owners[2:]) == [0, 1]
        for mb in step.microbatches:
            tokens = mb["attention_mask"].sum(1)
            assert 0 < int(tokens.sum()) <= config.token_cap
            seen += len(tokens)
    assert seen == len(rows)


def test_bad_rows_and_processors_are_refused(llava, qwen):
    text_row = _rows(False)[0]
    with pytest.raises(CorruptSample, match="more image items"):
        qwen.describe(dict(text_row, messages=[_user(IMAGE, _text("?")), _reply("!")]))
    with pytest.raises(CorruptSample, match="1 images but 0"):
        qwen.describe(dict(text_row, images=[random_image(8, 8)]))
    with pytest.raises(CorruptSample, match="takes no videos"):
        llava.describe(_rows(True)[3])
    odd = tiny_llava_processor()
    odd.chat_template = odd.chat_template.replace("'ASSISTANT:'", "'ASSISTANT (reply):'")
    with pytest.raises(ValueError, match="up to message 1 as a prefix"):
        SampleBuilder(odd).process(text_row)
    with pytest.raises(TypeError, match="supported: LlavaProcessor"):
        SampleBuilder(llava.tokenizer)
    sampler = BalancedBatchSampler(
        [qwen.describe(text_row).with_text_tokens(3)],
        qwen.balancer_config(pipeline_size=1, microbatches=1, token_cap=99),
    )
    step = next(iter(sampler)).map(lambda mb: [text_row for _ in mb])
    length = len(qwen.process(text_row)["input_ids"])
    with pytest.raises(ValueError, match=f"'text' has {length} tokens but the balancer planned 3"):
        qwen.collate_step(step)


def test_a_saved_processor_loads_through_auto_processor(tmp_path, llava):
    llava.processor.save_pretrained(tmp_path)
    loaded = SampleBuilder.from_pretrained(tmp_path)
    row = _rows(False)[1]
    assert loaded.describe(row) == llava.describe(row)
    assert torch.equal(loaded.process(row)["labels"], llava.process(row)["labels"])
