"""Records of what each fault or bad input a test tried did, for ``docs/reliability.md``.

The table in that document is generated, not written: a test that injects a fault (a lost rank,
a damaged shard, a refused configuration) calls :func:`record` with the case and what happened,
after it checked the outcome, and ``tests/faults/report.py`` renders every record into the
document. Each call writes one JSON file into :func:`records_dir`, named after its section and
case, so running a test again replaces its row instead of adding one.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["load_records", "record", "records_dir"]


def records_dir() -> Path:
    """``$BIGMAC_RELIABILITY_DIR``, else ``runs/reliability`` in the repository (git-ignored)."""
    env = os.environ.get("BIGMAC_RELIABILITY_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "runs" / "reliability"


def record(case: str, outcome: str, *, section: str = "Lost peers", measured: str = "") -> None:
    """Add (or replace) the row ``case`` of ``section``: ``outcome`` says what the software did
    (one sentence), ``measured`` any figures (times, sizes). The test that calls it is noted."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    row = {
        "section": section,
        "case": case,
        "outcome": outcome,
        "measured": measured,
        "test": test,
        "date": datetime.date.today().isoformat(),
    }
    folder = records_dir()
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{section} {case}".lower()).strip("-")
    (folder / f"{slug}.json").write_text(json.dumps(row, indent=1) + "\n")


def load_records(folder: Path | None = None) -> list[dict[str, Any]]:
    """Every record in ``folder`` (default :func:`records_dir`), by section and case."""
    paths = sorted((folder or records_dir()).glob("*.json"))
    return sorted((json.loads(p.read_text()) for p in paths), key=lambda r: (r["section"], r["case"]))
