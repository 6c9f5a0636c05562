"""The map-style batch sampler: data-parallel split, determinism, exact resume, bad input, HF datasets."""

import dataclasses
import json

import pytest

from balancer import BalancedBatchSampler, BalancerConfig, Sample, SkippedSampleWarning, StepDataset


def _check_step(step, samples, config):
    p = config.pipeline_size
    assert len(step.microbatches) == len(step.owners) == config.microbatches
    for mb, keys in zip(step.microbatches, step.keys, strict=True):
        assert mb and [samples[i].key for i in mb] == list(keys)
        assert sum(config.cost_model.cost(s).tokens for s in (samples[i] for i in mb)) <= config.token_cap
    for g in range(0, config.microbatches, p):
        assert sorted(step.owners[g : g + p]) == list(range(p))


def _view(steps):
    return [(s.epoch, s.step, s.microbatches, s.owners) for s in steps]


def test_two_replicas_cover_a_full_epoch_exactly_once(mix, config):
    samples = mix(300)
    runs = [list(BalancedBatchSampler(samples, config, dp_rank=r, dp_size=2, seed=1)) for r in (0, 1)]
    assert len(runs[0]) == len(runs[1]) > 3  # every replica runs the same steps ...
    for steps in runs:
        for step in steps:
            _check_step(step, samples, config)  # ... each with the same M
    keys = [k for steps in runs for step in steps for mb in step.keys for k in mb]
    assert len(keys) == len(set(keys)) == len(samples)  # nothing lost, nothing repeated
    assert [s.state for s in runs[0]] == [s.state for s in runs[1]]  # one global plan


def test_a_seed_fixes_the_epoch_and_epochs_differ(mix, config):
    samples = mix(120)
    a = BalancedBatchSampler(samples, config, seed=7)
    first = list(a)
    assert _view(first) == _view(BalancedBatchSampler(samples, config, seed=7))
    assert _view(first) != _view(BalancedBatchSampler(samples, config, seed=8))
    second = list(a)  # a full pass moved on to epoch 1
    assert second[0].epoch == 1 and second[0].microbatches != first[0].microbatches
    a.set_epoch(0)
    assert _view(a) == _view(first)
    assert len(a) == len(first)


def test_resume_from_any_step_yields_the_same_remaining_microbatches(mix, config):
    samples = mix(300)
    full = list(BalancedBatchSampler(samples, config, dp_rank=1, dp_size=2, seed=3))
    assert any(step.state["planned"] for step in full), "the epoch's tail should be planned ahead"
    for cut in range(len(full)):
        state = json.loads(json.dumps(full[cut].state))  # plain JSON, as a checkpoint stores it
        resumed = BalancedBatchSampler(samples, config, dp_rank=1, dp_size=2, seed=3)
        resumed.load_state_dict(state)
        assert _view(resumed) == _view(full[cut + 1 :])


def test_state_dict_without_workers_tracks_the_last_step(mix, config):
    samples = mix(200)
    sampler = BalancedBatchSampler(samples, config, seed=0)
    it = iter(sampler)
    next(it)
    second = next(it)
    assert sampler.state_dict() == second.state
    other = BalancedBatchSampler(samples, config, seed=0)
    other.load_state_dict(sampler.state_dict())
    assert other.state_dict() == second.state
    assert _view(other) == _view(list(it))


def test_hf_dataset_through_a_torch_dataloader(config):
    datasets = pytest.importorskip("datasets")
    torch_data = pytest.importorskip("torch.utils.data")
    n = 120
    table = datasets.Dataset.from_dict(
        {
            "id": [f"row{i}" for i in range(n)],
            "text_tokens": [50 + (i * 37) % 700 for i in range(n)],
            "width": [224 + (i * 53) % 600 if i % 4 else 0 for i in range(n)],
            "height": [224 + (i * 29) % 600 if i % 4 else 0 for i in range(n)],
        }
    )
    descriptors = [
        Sample(
            key=r["id"],
            text_tokens=r["text_tokens"],
            images=((r["height"], r["width"]),) if r["width"] else (),
        )
        for r in table
    ]
    sampler = BalancedBatchSampler(descriptors, config, seed=0)
    loader = torch_data.DataLoader(
        StepDataset(table),
        batch_sampler=sampler,
        collate_fn=lambda step: step.map(lambda rows: [r["id"] for r in rows]),
    )
    seen = []
    for step in loader:
        assert [list(mb) for mb in step.microbatches] == [list(k) for k in step.keys]
        seen += [k for mb in step.microbatches for k in mb]
    assert sorted(seen) == sorted(table["id"])


def test_a_sample_over_the_cap_is_an_error_naming_its_key(config):
    samples = [Sample(key=f"ok{i}", text_tokens=100) for i in range(20)]
    samples.insert(5, Sample(key="too-long", text_tokens=5000))
    with pytest.raises(ValueError, match=r"'too-long' has 5000 LLM tokens > token_cap=4096.*oversize='skip'"):
        list(BalancedBatchSampler(samples, config, shuffle=False))


def test_oversize_skip_and_truncate_are_counted(config):
    base = [Sample(key=f"ok{i}", text_tokens=100) for i in range(20)]
    long_text = Sample(key="long-text", text_tokens=5000, images=((448, 448),))  # 256 image tokens
    huge_image = Sample(key="huge-image", text_tokens=10, images=((4000, 4000),))  # 20449 image tokens
    samples = [*base, long_text, huge_image]

    skip = BalancerConfig(pipeline_size=2, microbatches=4, token_cap=4096, oversize="skip")
    with pytest.warns(SkippedSampleWarning) as caught:
        steps = list(BalancedBatchSampler(samples, skip, shuffle=False))
    assert ["long-text" in str(w.message) for w in caught] == [True, False]
    assert steps[-1].state["counters"] == {"oversize": 2}
    assert "long-text" not in {k for s in steps for mb in s.keys for k in mb}

    cut = BalancerConfig(pipeline_size=2, microbatches=4, token_cap=4096, oversize="truncate")
    with pytest.warns(SkippedSampleWarning, match="huge-image.*images and videos alone"):
        steps = list(BalancedBatchSampler(samples, cut, shuffle=False))
    assert steps[-1].state["counters"] == {"truncated": 1, "oversize": 1}
    kept = {s.key: s for step in steps for mb in step.samples for s in mb}
    assert kept["long-text"].text_tokens == 4096 - 256
    assert cut.cost_model.cost(kept["long-text"]).tokens == 4096


def test_too_few_or_no_samples_are_clear_errors(config):
    with pytest.raises(ValueError, match="yielded no usable samples"):
        list(BalancedBatchSampler([], config))
    few = [Sample(key=f"s{i}", text_tokens=10) for i in range(3)]
    with pytest.raises(ValueError, match="3 usable samples left, fewer than the 8 microbatches"):
        list(BalancedBatchSampler(few, config, dp_size=2))
    with pytest.raises(ValueError, match="dp_rank=2"):
        BalancedBatchSampler(few, config, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="not a bigmac-balancer/1"):
        BalancedBatchSampler(few, config).load_state_dict({"epoch": 0})


@pytest.mark.parametrize("layout", [{"dp_size": 2}, {"pipeline_size": 4, "microbatches": 8}])
def test_resume_on_another_layout_trains_every_remaining_sample_once(mix, config, layout):
    """A state saved with one replica of P=2, M=4 resumes with two replicas, or P=4 and M=8: the
    steps it had already planned no longer fit, so they are planned again, and every sample of the
    epoch is still trained exactly once."""
    samples = mix(300)
    saved = list(BalancedBatchSampler(samples, config, seed=5))
    dp = layout.get("dp_size", 1)
    other = dataclasses.replace(config, **{k: v for k, v in layout.items() if k != "dp_size"})
    resumed_with_plans = 0
    for k in range(1, len(saved)):
        state = saved[k - 1].state
        resumed_with_plans += bool(state["planned"])
        runs = []
        for rank in range(dp):
            sampler = BalancedBatchSampler(samples, other, dp_rank=rank, dp_size=dp, seed=5)
            sampler.load_state_dict(state)
            runs.append(list(sampler))
        for steps in runs:
            for step in steps:
                _check_step(step, samples, other)
        before = [key for step in saved[:k] for mb in step.keys for key in mb]
        after = [key for steps in runs for step in steps for mb in step.keys for key in mb]
        assert sorted(before + after) == sorted(s.key for s in samples), k
    assert resumed_with_plans  # some states held planned steps that had to be planned again
