"""Every supported HF family trained under strategy="bigmac" against strategy="auto" in one process,
and HF's ``generate`` from the trained weights.

One forkserver launch per world size trains all families (and, for two processes, both layouts):
process start-up is most of the cost. Asserted: each of 5 AdamW steps' loss, the validation loss
and every final parameter within 1e-5 of the one-process run; the tied embeddings of llava-qwen2
end as one weight.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_bigmac.contract import reference_loss
from lightning_bigmac.hf import HFVLMModule
from lightning_bigmac.hf.testing import TINY_FAMILIES, fit_layouts, fit_tiny, tiny_config, tiny_microbatches
from lightning_bigmac.testing.spawn import run

pytestmark = pytest.mark.slow

STEPS, LR = 5, 1e-2
WEIGHT_DECAY = 0.1
"""With weight decay, a parameter no step uses (Llava's last CLIP layer, ``vision_feature_layer=-2``)
stays put only if its gradient stays None, as in one process."""
EMBEDDING, HEAD = "model.model.language_model.embed_tokens.weight", "model.lm_head.weight"


def _zero_gradient_in_exact_arithmetic(name: str) -> bool:
    """A key projection's bias shifts every score of a query by the same amount, which softmax
    ignores: its gradient is rounding noise, which Adam's normalisation turns into full steps."""
    return name.endswith(("k_proj.bias", "attn.qkv.bias"))


@pytest.fixture(scope="module")
def auto_runs() -> dict[str, dict]:
    """strategy="auto" on one process for every family: losses, validation loss, the trained module."""
    runs = {}
    for family in TINY_FAMILIES:
        pl.seed_everything(0, verbose=False)
        module = HFVLMModule(tiny_config(family), lr=LR, weight_decay=WEIGHT_DECAY)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        trainer, losses = fit_tiny(module, family, "auto", devices=1, steps=STEPS)
        val_loss = float(trainer.callback_metrics["val_loss"])
        runs[family] = {"losses": losses, "val_loss": val_loss, "module": module, "before": before}
    return runs


@pytest.mark.parametrize(("devices", "layouts"), [(2, [(2, 1), (2, 2)]), (4, [(4, 1)])])
def test_bigmac_layouts_train_every_family_as_one_process(auto_runs, devices, layouts):
    got = run(
        fit_layouts, devices, layouts, STEPS, LR, WEIGHT_DECAY, timeout=120.0, start_method="forkserver"
    )[0]
    assert sorted(got) == sorted(f"{p}x{v}/{family}" for p, v in layouts for family in TINY_FAMILIES)
    for key, fitted in got.items():
        ref = auto_runs[key.split("/")[1]]
        worst = max(abs(a - b) for a, b in zip(fitted["losses"], ref["losses"], strict=True))
        assert len(fitted["losses"]) == STEPS and worst <= 1e-5, f"{key}: losses differ by {worst:.2e}"
        assert fitted["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-5), key
        want = ref["module"].state_dict()
        assert fitted["params"].keys() == want.keys(), key
        if key.endswith("llava-qwen2"):
            tied = (fitted["params"][name] for name in (EMBEDDING, HEAD))
            assert torch.equal(*tied), key
        for name, value in fitted["params"].items():
            if not _zero_gradient_in_exact_arithmetic(name):
                diff = (value - want[name]).abs().max().item()
                assert diff <= 1e-5, f"{key}: {name} differs by {diff:.2e}"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generate_from_the_trained_weights_agrees_with_the_pipeline_parts(auto_runs, family):
    fitted = auto_runs[family]
    module = fitted["module"].eval()
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, fitted["before"][k])]
    assert len(changed) > len(fitted["before"]) // 2  # the weights generate reads are the trained ones
    prompt = tiny_microbatches(family, 2, seed=7)[1]  # one sample with an image (Qwen: and a video)
    inputs = {k: v for k, v in prompt.items() if k != "labels"}
    with torch.no_grad():
        generated = module.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        outputs: list = []
        reference_loss(module.pipeline_parts(), [prompt], eval_outputs=outputs)
    length = prompt["input_ids"].shape[1]
    assert torch.equal(generated[:, :length], prompt["input_ids"]) and generated.shape[1] > length
    # greedy decoding's first token is the adapter's prediction at the prompt's last position
    assert generated[0, length] == outputs[0]["preds"][0, -1]
