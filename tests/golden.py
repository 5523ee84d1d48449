"""Golden transcripts: the plain-text timeline of a deterministic run, compared byte for byte.

Set ``LAB_UPDATE_GOLDEN=1`` to rewrite them after an intended change, then read the diff.
"""

import os
from pathlib import Path

EXPECTED = Path(__file__).parent / "expected"


def assert_matches_golden(name: str, actual: str) -> None:
    path = EXPECTED / name
    if os.environ.get("LAB_UPDATE_GOLDEN") == "1":
        path.write_text(actual)
    assert path.exists(), f"no golden transcript {path}; run with LAB_UPDATE_GOLDEN=1 to create it"
    assert actual == path.read_text(), f"timeline differs from {path} (LAB_UPDATE_GOLDEN=1 rewrites it)"
