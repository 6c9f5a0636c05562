"""The end of an epoch in the adapters' state, and moving a step's tensors the way Lightning does."""

import pytest

from balancer import BalancedBatchSampler, BalancedStream, Sample
from balancer.steps import epoch_done, make_state

torch = pytest.importorskip("torch")


def _sampler(mix, config):
    return BalancedBatchSampler(mix(150), config, seed=2)


def _stream(mix, config):
    samples = mix(150)
    return BalancedStream(lambda epoch: samples[epoch:] + samples[:epoch], config, describe=lambda s: (s, s))


@pytest.mark.parametrize("adapter", [_sampler, _stream])
def test_only_the_state_of_an_epochs_last_step_is_done(adapter, mix, config):
    steps = list(adapter(mix, config))
    assert any(s.state["planned"] for s in steps)  # the tail was planned ahead: still not done
    assert [epoch_done(s.state) for s in steps] == [False] * (len(steps) - 1) + [True]
    assert not epoch_done(make_state(1, 0, 0))
    resumed = adapter(mix, config)
    resumed.load_state_dict(steps[-1].state)
    assert list(resumed) == []  # the rest of the finished epoch


def test_a_step_batch_moves_its_tensors_and_keeps_the_rest(config):
    samples = [Sample(key=f"s{i}", text_tokens=50 + i) for i in range(40)]
    step = next(iter(BalancedBatchSampler(samples, config, shuffle=False)))
    step = step.map(lambda rows: {"ids": torch.tensor(rows), "rows": rows})
    moved = step.to(torch.float64)  # what Lightning's device transfer calls; a dtype stands in for a device
    assert all(mb["ids"].dtype == torch.float64 for mb in moved.microbatches)
    assert [mb["rows"] for mb in moved.microbatches] == [mb["rows"] for mb in step.microbatches]
    assert (moved.samples, moved.owners, moved.state) == (step.samples, step.owners, step.state)
    assert step.microbatches[0]["ids"].dtype == torch.int64  # a copy: the original is untouched
