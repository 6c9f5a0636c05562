"""The stream wrapper: equal steps on every replica, fixed M, exact resume, bad input, empty streams."""

import json

import pytest

from balancer import BalancedStream, CorruptSample, Sample, Skipped, SkippedSampleWarning


def _describe(element):
    """Stream elements are dicts; ``bad`` marks one whose content cannot be decoded."""
    if element.get("bad"):
        raise CorruptSample(element["sample"].key, "cannot decode image 0")
    return element["sample"].key, element["sample"]


def _source(samples, extra=()):
    def source(epoch):
        yield from ({"sample": s} for s in samples)
        yield from extra

    return source


def _view(steps):
    return [(s.epoch, s.step, s.microbatches, s.owners) for s in steps]


def _check_replicas(runs, keys, config):
    """Same step count on every replica (else the job hangs), full steps, every key exactly once."""
    assert len(runs[0]) == len(runs[1]) > 1
    assert [s.state for s in runs[0]] == [s.state for s in runs[1]]  # one global plan
    seen = [k for steps in runs for step in steps for mb in step.keys for k in mb]
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(keys)
    p = config.pipeline_size
    for steps in runs:
        for step in steps:
            assert len(step.microbatches) == config.microbatches and all(step.microbatches)
            for g in range(0, config.microbatches, p):
                assert sorted(step.owners[g : g + p]) == list(range(p))


def test_two_replicas_yield_equal_steps_and_lose_nothing(mix, config):
    samples = mix(310)
    runs = [
        list(BalancedStream(_source(samples), config, describe=_describe, dp_rank=r, dp_size=2))
        for r in (0, 1)
    ]
    _check_replicas(runs, [s.key for s in samples], config)


def test_unequal_shards_and_skips_still_give_every_replica_the_same_steps(mix, config):
    # shards of 7, 180 and 41 samples, a corrupt element and a broken shard: split by shard
    # (replica r reading shards r, r + 2, ...), one replica would get 48 samples and the other
    # 180, run about four times the steps, and hang the job at the end of the epoch
    shards = [mix(n, seed=n, prefix=f"shard{n}-") for n in (7, 180, 41)]
    corrupt = {"sample": Sample(key="broken-jpeg", text_tokens=5), "bad": True}

    def source(epoch):
        for shard in shards:
            yield from ({"sample": s} for s in shard)
        yield corrupt
        yield Skipped("broken_shard", "shard-3.tar", "unexpected end of data")

    with pytest.warns(SkippedSampleWarning):
        runs = [
            list(BalancedStream(source, config, describe=_describe, dp_rank=r, dp_size=2)) for r in (0, 1)
        ]
    _check_replicas(runs, [s.key for shard in shards for s in shard], config)
    assert runs[1][-1].state["counters"] == {"corrupt": 1, "broken_shard": 1}


def test_resume_from_any_step_including_the_planned_tail(mix, config):
    samples = mix(250)
    full = list(BalancedStream(_source(samples), config, describe=_describe))
    assert any(step.state["planned"] for step in full)
    for cut in range(len(full)):
        resumed = BalancedStream(_source(samples), config, describe=_describe)
        resumed.load_state_dict(json.loads(json.dumps(full[cut].state)))
        assert _view(resumed) == _view(full[cut + 1 :])


def test_resume_describes_only_what_the_state_still_holds(mix, config):
    samples = mix(250)
    full = list(BalancedStream(_source(samples), config, describe=_describe))
    state = full[len(full) // 2].state
    described = []

    def counting(element):
        described.append(element["sample"].key)
        return _describe(element)

    resumed = BalancedStream(_source(samples), config, describe=counting)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert _view(rest) == _view(full[len(full) // 2 + 1 :])
    assert len(described) == len(samples) - (state["consumed"] - len(state["buffer"]))


def test_corrupt_and_unreadable_elements_are_skipped_with_counted_warnings(mix, config):
    samples = mix(60)
    bad = [{"sample": Sample(key="broken-jpeg", text_tokens=5), "bad": True}]
    lost = [Skipped("broken_shard", "shard-7.tar", "unexpected end of data")]
    stream = BalancedStream(_source(samples, [*bad, *lost]), config, describe=_describe)
    with pytest.warns(SkippedSampleWarning) as caught:
        steps = list(stream)
    messages = " ".join(str(w.message) for w in caught)
    assert "broken-jpeg" in messages and "shard-7.tar" in messages
    assert steps[-1].state["counters"] == {"corrupt": 1, "broken_shard": 1}
    assert sorted(k for s in steps for mb in s.microbatches for k in mb) == sorted(s.key for s in samples)


def test_an_empty_stream_is_a_clear_error(config):
    with pytest.raises(ValueError, match="stream dp_rank 1: epoch 0 yielded no usable samples"):
        list(BalancedStream(_source([]), config, describe=_describe, dp_rank=1, dp_size=2))
    only_bad = _source([], [Skipped("broken_shard", "a.tar")])
    with pytest.warns(SkippedSampleWarning), pytest.raises(ValueError, match="broken_shard"):
        list(BalancedStream(only_bad, config, describe=_describe))


def test_many_dataloader_workers_are_refused(mix, config, monkeypatch):
    torch_data = pytest.importorskip("torch.utils.data")

    class Info:
        num_workers = 2

    monkeypatch.setattr(torch_data, "get_worker_info", lambda: Info())
    with pytest.raises(ValueError, match="num_workers=2"):
        list(BalancedStream(_source(mix(40)), config, describe=_describe))
