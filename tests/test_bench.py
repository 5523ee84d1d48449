"""`make bench` in its quick mode: it runs end to end and reports every figure. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

from lab.registry import SCENARIOS


def test_quick_bench_writes_every_figure_with_a_positive_value(tmp_path: Path) -> None:
    """`python -m lab.bench --quick` exits 0, prints the table, and writes each figure with positive numbers."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "lab.bench", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "× floor" in done.stdout
    results = json.loads(out.read_text())
    assert results["meta"]["runs"] == 1
    figures = results["figures"]
    expected = {
        "startup.lab_run_1", "startup.imports", "startup.provision", "startup.provision_cold",
        "explore.s1.buggy.2", "explore.s1.fixed.3", "price.asyncpg_alone",
        *(f"stress.s1.{side}.{n}" for side in ("buggy", "fixed") for n in (2, 10, 100)),
        *(f"reduction.s{n}.{side}.2" for n in (1, 4) for side in ("buggy", "fixed")),
        *(
            f"price.s{info.number}.fixed.{what}"
            for info in SCENARIOS.values() if info.contract in ("handle_charge", "handle_event")
            for what in ("throughput", "p50", "p99", "vs_buggy")
        ),
    }  # fmt: skip
    assert expected <= figures.keys()
    for key, figure in figures.items():
        assert figure["value"] > 0, key
        assert figure["floor"] is None or figure["floor"] > 0, key
        assert all(sample > 0 for sample in figure["samples"] + figure["floor_samples"]), key
