"""The overhead benchmark's step is what the balancer would feed the runtime: even LLM lengths."""

from __future__ import annotations

from runtime_overhead import EXAMPLE_MODEL, balanced_step

from lightning_bigmac.testing.scenarios import build_case_plan, case_microbatches


def test_the_benchmark_step_is_packed_by_the_balancer() -> None:
    cap = EXAMPLE_MODEL["max_len"]
    sizes, owners = balanced_step(2, 32, cap)
    lengths = [images * EXAMPLE_MODEL["patches"] + text for images, text in sizes]
    assert len(sizes) == 32 and max(lengths) <= cap
    assert max(lengths) - min(lengths) <= 0.05 * max(lengths)  # unpacked samples vary 4x
    assert len({images for images, _ in sizes}) > 1  # encoder work still differs per microbatch
    assert all(sorted(owners[g : g + 2]) == [0, 1] for g in range(0, 32, 2))

    case = {"schedule": "bigmac", "microbatches": 32, "model": EXAMPLE_MODEL}
    case |= {"sizes": sizes, "owners": owners}
    mbs = case_microbatches(case, 0)
    assert [(len(mb["images"]), len(mb["tokens"])) for mb in mbs] == [tuple(s) for s in sizes]
    plan = build_case_plan(case, 2, 1)
    owner_of = {str(op): r for r, ops in enumerate(plan.ranks) for op in ops}
    assert [owner_of[f"EF.{j}"] for j in range(32)] == owners
