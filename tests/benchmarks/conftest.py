"""The benchmark scripts are not a package: put ``benchmarks/`` on the path so tests import them by name
(``spawn`` hands ``sys.path`` to its children, so functions of these modules run there too)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
