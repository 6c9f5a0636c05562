"""The split backward in one process: input gradients first, weight gradients later, together the same
gradients as one backward, on graphs that split cleanly and on those that cannot."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_bigmac.runtime.backward import backward_input, backward_weight


def _transformer() -> nn.Module:
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[..., tuple[torch.Tensor, ...]], int]] = {
    "mlp and layer norm": (
        lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8)),
        lambda m, x: (m(x),),
        1,
    ),
    "transformer layer": (_transformer, lambda m, x: (m(x.view(1, 4, 8)).view(4, 8),), 1),
    "a weight used twice in a chain": (nn.Linear, lambda m, x: (m(torch.tanh(m(x))),), 1),
    "an output that ignores the input": (
        lambda: nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]),
        lambda m, x: (m[0](x), m[1](torch.ones(4, 8))),
        1,
    ),
    "two outputs of one op": (lambda: nn.Linear(8, 16), lambda m, x: tuple(m(x).chunk(2, dim=1)), 1),
    "an unused input": (nn.Linear, lambda m, x, y: (m(x),), 2),
    "hidden states and a loss from them": (
        lambda: nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 1)]),
        lambda m, x: (lambda h: (h, m[1](h).sum()))(m[0](x)),
        1,
    ),
    "an embedding merged with the input": (
        lambda: nn.Embedding(10, 8),
        lambda m, x: (m(torch.arange(4)) + x,),
        1,
    ),
}


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    make = CASES[name][0]
    return make() if make is not nn.Linear else nn.Linear(8, 8)


@pytest.mark.parametrize("inputs_need_grad", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_both_halves_give_one_backwards_gradients(name: str, inputs_need_grad: bool) -> None:
    _, forward, n_inputs = CASES[name]
    whole = _make(name)
    split = copy.deepcopy(whole)
    torch.manual_seed(1)
    xs = [torch.randn(4, 8, requires_grad=inputs_need_grad) for _ in range(n_inputs)]
    xs2 = [x.detach().clone().requires_grad_(inputs_need_grad) for x in xs]
    outs = forward(whole, *xs)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)

    input_grads, pending = backward_input(list(forward(split, *xs2)), grads, xs2)
    assert all(p.grad is None for p in split.parameters())  # the input half leaves the weights alone
    backward_weight(pending)
    for x, got in zip(xs, input_grads, strict=True):
        assert (got is None) == (x.grad is None)
        if got is not None:
            torch.testing.assert_close(got, x.grad, rtol=0, atol=1e-6)
    for (pname, p), q in zip(whole.named_parameters(), split.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), pname
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=pname)


def test_the_weight_half_does_not_redo_the_input_half() -> None:
    """A clean chain splits into one weight call per layer, each starting at its meeting node;
    only a weight used twice in a chain falls back to the outputs (exact, with repeated work)."""
    model = _make("mlp and layer norm")
    x = torch.randn(4, 8, requires_grad=True)
    out = model(x)
    _, pending = backward_input([out], [torch.ones_like(out)], [x])
    assert len(pending.calls) == 3  # Linear, Linear, LayerNorm
    assert all(not isinstance(s, torch.Tensor) for starts, _, _ in pending.calls for s in starts)

    tied = _make("a weight used twice in a chain")
    out = tied(torch.tanh(tied(x)))
    _, pending = backward_input([out], [torch.ones_like(out)], [x])
    ((starts, _, params),) = pending.calls
    assert len(starts) == 1 and starts[0] is out and len(params) == 2  # from the output, exactly


def test_nothing_to_do_without_gradients() -> None:
    x = torch.randn(3, requires_grad=True)
    got, pending = backward_input([x * 2, "not a tensor"], [None, None], [x, 5])
    assert got == [None, None] and pending.calls == []
