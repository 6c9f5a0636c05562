"""One process group per layout, shared by every test that needs it (start-up dominates on 2 cores).

Each layout runs all its cases (:func:`~lightning_bigmac.testing.scenarios.layout_cases`) in one
spawn; tests pick their cases by index.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lightning_bigmac.testing.scenarios import layout_cases, run_cases
from lightning_bigmac.testing.spawn import run

_CACHE: dict[tuple[int, int, int], tuple[list[dict], list[list[dict]]]] = {}


@pytest.fixture(scope="session")
def run_layout() -> Callable[[int, int, int], tuple[list[dict], list[list[dict]]]]:
    """``run_layout(pp, dp, vpp) -> (cases, results[rank][case])``, spawned once per layout."""

    def get(pp: int, dp: int, vpp: int) -> tuple[list[dict], list[list[dict]]]:
        key = (pp, dp, vpp)
        if key not in _CACHE:
            cases = layout_cases(pp, dp, vpp)
            _CACHE[key] = (cases, run(run_cases, pp * dp, pp, dp, vpp, cases, timeout=60.0))
        return _CACHE[key]

    return get
