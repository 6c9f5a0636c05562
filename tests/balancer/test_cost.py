"""Sample descriptors, the per-module cost model and fitting its coefficients from a profile."""

import math
import random

import pytest

from balancer import Coefficients, Geometry, Sample, SampleCostModel, Term, fit_coefficients


def test_spans_follow_patches_tokens_and_latents():
    model = SampleCostModel(geometry=Geometry(patch_size=14, merge=2, temporal_patch=2, latent_patch=16))
    sample = Sample(key="a", text_tokens=10, images=((280, 300),), videos=((5, 56, 56),), outputs=((64, 32),))
    enc, tokens, gen = model.spans(sample)
    # image: ceil(280/28)=10 x ceil(300/28)=11 tokens, 4 patches each; video: 3 slices of 2x2 tokens
    assert enc == (440, 16, 16, 16)
    assert tokens == 10 + 110 + 3 * 4
    assert gen == (8,)


def test_llm_attention_over_the_pack_or_per_sample_and_overhead_per_microbatch():
    c = Coefficients(llm_forward=Term(linear=1.0, quadratic=0.5, overhead=7.0), llm_backward=Term(linear=2.0))
    a, b = Sample(key="a", text_tokens=3), Sample(key="b", text_tokens=4)
    pack = SampleCostModel(coefficients=c)
    per_sample = SampleCostModel(coefficients=c, llm_attention="sample")
    assert pack.op_costs([a, b])["llm_forward"] == pytest.approx(7.0 + 3 + 4 + 0.5 * 7**2)
    assert per_sample.op_costs([a, b])["llm_forward"] == pytest.approx(7.0 + 3 + 4 + 0.5 * (9 + 16))
    assert pack.op_costs([a, b])["encoder_forward"] == 0.0  # no images: no overhead either
    # the packer balances the additive part; over the pack the quadratic term is the microbatch's
    assert pack.cost(a).llm == pytest.approx(3.0 * 3)
    assert per_sample.cost(a).llm == pytest.approx(3.0 * 3 + 0.5 * 9)
    assert pack.cost(a).owner == pack.cost(a).encoder + pack.cost(a).generator == 0.0
    with pytest.raises(ValueError, match=r"llm_attention='causal'.*'pack'.*'sample'"):
        SampleCostModel(llm_attention="causal")


def test_bad_descriptors_name_the_key():
    with pytest.raises(ValueError, match=r"'x'.*text_tokens"):
        Sample(key="x", text_tokens=-1)
    with pytest.raises(ValueError, match=r"'y'.*video"):
        Sample(key="y", videos=((0, 10, 10),))
    with pytest.raises(TypeError, match="key"):
        Sample(key="")
    with pytest.raises(ValueError, match="patch_size"):
        Geometry(patch_size=0)


def test_coefficients_round_trip_and_unknown_keys():
    c = Coefficients(generator=Term(linear=2.0, quadratic=0.1, overhead=1.0))
    assert Coefficients.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown coefficient"):
        Coefficients.from_dict({"vision": {"linear": 1.0}})


def _profile(truth: Coefficients, microbatches, pp=2, vpp=2, noise=0.0, llm_attention="pack"):
    """A bigmac-profile/1 step whose durations follow ``truth`` (LLM spread over every chunk)."""
    model = SampleCostModel(coefficients=truth, llm_attention=llm_attention)
    rng = random.Random(0)
    events, t = [], 0.0
    for j, mb in enumerate(microbatches):
        ops = model.op_costs(mb)
        timed = [(0, f"EF.{j}", ops["encoder_forward"]), (0, f"EB.{j}", ops["encoder_backward"])]
        timed.append((pp - 1, f"G.{j}", ops["generator"]))
        for r in range(pp):
            for c in range(vpp):
                timed += [(r, f"F{c}.{j}", ops["llm_forward"] / (pp * vpp))]
                timed += [(r, f"B{c}.{j}", ops["llm_backward"] / (pp * vpp))]
        for rank, op, d in timed:
            if d > 0:
                d *= 1 + noise * rng.uniform(-1, 1)
                events.append({"rank": rank, "op": op, "start": t, "end": t + d})
                t += d
    return {
        "format": "bigmac-profile/1",
        "pp": pp,
        "vpp": vpp,
        "microbatches": len(microbatches),
        "events": events,
    }


def _microbatches(n=24, seed=1):
    rng = random.Random(seed)
    out = []
    for j in range(n):
        mb = []
        for k in range(rng.randint(1, 4)):
            images = tuple((rng.randint(100, 900), rng.randint(100, 900)) for _ in range(rng.randint(0, 3)))
            outputs = ((rng.randint(128, 512), rng.randint(128, 512)),) if rng.random() < 0.5 else ()
            mb.append(
                Sample(key=f"{j}-{k}", text_tokens=rng.randint(10, 3000), images=images, outputs=outputs)
            )
        out.append(mb)
    return out


@pytest.mark.parametrize("llm_attention", ["pack", "sample"])
def test_fit_recovers_the_coefficients_that_made_the_profile(llm_attention):
    truth = Coefficients(
        encoder_forward=Term(linear=0.3, quadratic=2e-5, overhead=5.0),
        encoder_backward=Term(linear=0.6, quadratic=4e-5, overhead=1.0),
        llm_forward=Term(linear=1.5, quadratic=1e-4, overhead=20.0),
        llm_backward=Term(linear=3.0, quadratic=2e-4, overhead=0.0),
        generator=Term(linear=9.0, quadratic=3e-4, overhead=2.0),
    )
    mbs = _microbatches()
    profile = _profile(truth, mbs, llm_attention=llm_attention)
    fitted = fit_coefficients(profile, mbs, llm_attention=llm_attention)
    for name, want in truth.to_dict().items():
        got = fitted.to_dict()[name]
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-6), (name, k)


def test_fit_on_a_noisy_profile_predicts_well_and_never_goes_negative():
    truth = Coefficients()
    mbs = _microbatches(n=40, seed=2)
    fitted = fit_coefficients(_profile(truth, mbs, noise=0.05), mbs)
    for term in fitted.to_dict().values():
        assert min(term.values()) >= 0.0
    want, got = SampleCostModel(coefficients=truth), SampleCostModel(coefficients=fitted)
    for mb in mbs:
        w, g = want.op_costs(mb), got.op_costs(mb)
        for name in w:
            assert math.isclose(g[name], w[name], rel_tol=0.1, abs_tol=1.0), name


def test_kinds_the_profile_lacks_take_the_defaults_in_the_profiles_time_unit():
    truth = Coefficients(llm_forward=Term(linear=2e-6, quadratic=1e-10), llm_backward=Term(linear=4e-6))
    mbs = _microbatches(n=6)
    profile = _profile(truth, mbs)
    profile["events"] = [e for e in profile["events"] if not e["op"].startswith("G.")]
    fitted = fit_coefficients(profile, mbs)
    assert fitted.llm_forward.linear == pytest.approx(2e-6)
    assert fitted.generator.linear == pytest.approx(
        Coefficients().generator.linear * 2e-6
    )  # seconds, not FLOPs
    given = Coefficients(generator=Term(linear=42.0))
    assert fit_coefficients(profile, mbs, fallback=given).generator == given.generator


def test_fit_checks_its_input():
    mbs = _microbatches(n=6)
    profile = _profile(Coefficients(), mbs)
    with pytest.raises(ValueError, match="microbatch descriptors"):
        fit_coefficients(profile, mbs[:-1])
    with pytest.raises(ValueError, match="bigmac-profile/1"):
        fit_coefficients({"format": "other", "events": []}, mbs)
    bad = dict(profile, events=[{"rank": 0, "op": "F0.99", "start": 0.0, "end": 1.0}])
    with pytest.raises(ValueError, match="microbatch 99"):
        fit_coefficients(bad, mbs)
    encoder_only = dict(profile, events=[e for e in profile["events"] if e["op"].startswith("E")])
    with pytest.raises(ValueError, match="0 microbatches with LLM forwards"):
        fit_coefficients(encoder_only, mbs)
