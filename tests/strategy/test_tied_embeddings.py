"""Tied embeddings (the LM head's weight is the token embedding's) under ``strategy="bigmac"``.

The tied weight has a copy on the first and on the last stage's rank. Two spawned jobs train
the tiny MLLM with tied embeddings (AdamW, global-norm clipping that bites at every step): one
on two ranks (P=2, P=2 x V=2, and a P=2 run resumed from the P=2 run's checkpoint), one on
four (P=2 x D=2). Each must give the losses and the gradient norms of ``strategy="auto"`` in
one process within 1e-5, and end with every copy of the tied weight bitwise equal. In the
P=2 x V=2 run the last rank builds its copy differently: setup must make it stage 0's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lightning_bigmac import PipelineParts, consolidate
from lightning_bigmac.checkpoint import files, owned_state_dict
from lightning_bigmac.checkpoint.keys import SameAs
from lightning_bigmac.runtime.partition import partition, place
from lightning_bigmac.testing.contract_cases import TiedMLLMModule, fit_tied, tied_fits
from lightning_bigmac.testing.spawn import run
from lightning_bigmac.testing.tiny_mllm import TinyConfig, TinyMLLM

STEPS, CLIP = 4, 0.05  # the gradient norms are > 5: clipping scales every step
EMBEDDING, HEAD = "model.embedding.tokens.weight", "model.head.out.weight"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    ckpt = tmp_path_factory.mktemp("tied") / "p2.ckpt"
    common = {"pp": 2, "clip": CLIP, "steps": STEPS}
    two = [
        {**common, "save": str(ckpt)},
        {**common, "vpp": 2, "perturb_last": True},
        {**common, "epochs": 2, "resume": str(ckpt)},
    ]
    by_rank = run(tied_fits, 2, two, timeout=60.0, start_method="forkserver")
    p2, p2v2, resumed = ([r[i] for r in by_rank] for i in range(3))
    (p2d2,) = zip(*run(tied_fits, 4, [common], timeout=60.0, start_method="forkserver"), strict=True)
    return {
        "auto": fit_tied(clip=CLIP, steps=STEPS, epochs=2),
        "joined": fit_tied(clip=CLIP, steps=STEPS, join=2),
        "p2": p2, "p2v2": p2v2, "resumed": resumed, "p2d2": p2d2, "ckpt": ckpt,
    }  # fmt: skip


def _assert_like(ranks: list[dict], losses: list[float], norms: list[float]) -> None:
    for got in ranks:
        assert len(got["losses"]) == len(losses) > 0
        assert max(abs(a - b) for a, b in zip(got["losses"], losses, strict=True)) <= 1e-5, (got, losses)
        assert got["norms"] == pytest.approx(norms, rel=1e-5)
        assert got["one_tensor"]  # embedding and head still share one parameter on every rank
    copies = [got["tied"] for got in ranks if got["tied"] is not None]
    assert len(copies) == len(ranks)  # P=2: every rank holds the first or the last stage
    assert all(torch.equal(c, copies[0]) for c in copies)


@pytest.mark.slow
def test_tied_embeddings_train_as_in_one_process(runs: dict) -> None:
    auto = runs["auto"]
    _assert_like(runs["p2"], auto["losses"][:STEPS], auto["norms"][:STEPS])
    _assert_like(runs["p2v2"], auto["losses"][:STEPS], auto["norms"][:STEPS])
    _assert_like(runs["p2d2"], runs["joined"]["losses"], runs["joined"]["norms"])
    # counted twice, the tied gradient would give another norm (and other clipped steps)
    assert min(auto["norms"]) > 5 * CLIP


@pytest.mark.slow
def test_a_p2_checkpoint_stores_the_tied_weight_once_and_resumes(runs: dict) -> None:
    auto = runs["auto"]
    _assert_like(runs["resumed"], auto["losses"][STEPS:], auto["norms"][STEPS:])
    tensors = files.read_meta(runs["ckpt"])["bigmac"]["tensors"]
    stored = FileSystemReader(tensors).read_metadata().state_dict_metadata
    assert isinstance(stored[f"state_dict.{EMBEDDING}"], TensorStorageMetadata)
    assert not isinstance(stored[f"state_dict.{HEAD}"], TensorStorageMetadata)  # a SameAs
    assert not any(k.startswith(f"optimizer_states.0.state.{HEAD}") for k in stored)
    full = consolidate(runs["ckpt"])["state_dict"]
    assert torch.equal(full[HEAD], full[EMBEDDING]) and torch.equal(full[EMBEDDING], runs["p2"][0]["tied"])
    module = TiedMLLMModule()
    module.load_state_dict(full)
    assert torch.equal(module.model.head.out.weight, runs["p2"][1]["tied"])


def test_only_embedding_and_head_may_share_parameters() -> None:
    emb, head, block = nn.Embedding(4, 2), nn.Linear(2, 4), nn.Linear(2, 4)
    head.weight = emb.weight
    parts = PipelineParts(embedding=emb, blocks=[nn.Linear(2, 2)], head=head, text_targets=len)
    assert parts.tied == (("weight", "weight"),)
    block.weight = emb.weight
    with pytest.raises(
        ValueError, match=r"parameter blocks\.0\.weight is also embedding\.weight: pipeline parts"
    ):
        PipelineParts(embedding=emb, blocks=[block], head=nn.Linear(2, 4), text_targets=len)
    generator = nn.Linear(2, 4)
    generator.weight = head.weight
    with pytest.raises(ValueError, match=r"parameter generator\.weight is also embedding\.weight"):
        PipelineParts(
            embedding=emb, blocks=[nn.Linear(2, 2)], head=head, text_targets=len,
            generator=generator, generator_targets=len,
        )  # fmt: skip
    other = nn.Linear(2, 4)
    with pytest.raises(ValueError, match=r"parameter blocks\.1\.weight is also blocks\.0\.weight"):
        PipelineParts(embedding=emb, blocks=[other, other], head=nn.Linear(2, 4), text_targets=len)


@pytest.mark.parametrize(("pp", "rank", "held"), [(2, 0, True), (2, 1, True), (3, 1, False)])
def test_placing_keeps_the_tied_parameter_where_either_part_is(pp: int, rank: int, held: bool) -> None:
    model = TinyMLLM(TinyConfig(layers=3, tied=True), seed=0)
    before = model.embedding.tokens.weight.detach().clone()
    parts = model.parts()
    place(parts, partition(parts, pp=pp), rank=rank)
    weight = model.embedding.tokens.weight
    assert model.head.out.weight is weight and weight.is_meta != held
    if held:
        assert torch.equal(weight, before)
        owned = owned_state_dict(model)
        assert owned["head.out.weight"] == SameAs("embedding.tokens.weight")
        assert torch.equal(owned["embedding.tokens.weight"], before)
