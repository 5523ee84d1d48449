"""The isolation matrix: every cell explored and compared with its committed claim, lab/journeys/matrix.toml.

A cell's verdict is read from the database after each run (the invariant), and what PostgreSQL raised
from the sessions' own backends; the claim beside it says what should come out, and why. The 24 cells
take most of a minute, so each carries the ``matrix`` mark and ``make test-matrix`` runs them; ``make
test`` runs the rest: scenario 1's row through ``lab matrix`` itself, ``--show``, a surprise, and the
claim that surprises most (a retry turns scenario 4's saved interleavings into double applications).
"""

import os
import re
from pathlib import Path

import pytest
from rich.console import Console

import lab.journeys.matrix as matrix
from lab.journeys.matrix import (
    COLUMNS,
    RETRIED,
    SIDES,
    CellId,
    claims,
    column_title,
    explore_cell,
    matrix_journey,
    matrix_scenarios,
    show_cell,
)
from lab.postgres.workspace import Workspace
from lab.registry import SCENARIOS, scenario

ROOT = Path(__file__).resolve().parent.parent


def every_cell() -> list[object]:
    cells = [CellId(info.number, column, side) for info in matrix_scenarios() for side in SIDES for column in COLUMNS]
    return [pytest.param(cell, id=str(cell), marks=pytest.mark.matrix) for cell in cells]


def recording() -> Console:
    return Console(width=120, color_system=None, force_terminal=False, record=True, file=open(os.devnull, "w"))


@pytest.mark.parametrize("cell_id", every_cell())
async def test_every_cell_is_what_its_claim_says(cell_id: CellId, workspace: Workspace) -> None:
    """Every interleaving (and crash point) of the cell gives the committed verdict, anomalies, errors and answers."""
    cell = await explore_cell(recording(), workspace, cell_id)
    claim = claims()[cell_id.scenario, cell_id.side]
    assert cell.summary() == claim.cells[cell_id.column], claim.why
    assert cell.runs > 0
    if "·" in claim.cells[cell_id.column]:  # a claim that PostgreSQL raises: a run that shows it is kept
        assert cell.smallest_raising is not None


def test_the_claims_cover_every_scenario_that_runs_transactions() -> None:
    """Each such scenario (from the registry, not a list here) has a buggy and a fixed row, every column, and a why."""
    known = claims()
    assert sorted(known) == sorted((info.number, side) for info in matrix_scenarios() for side in SIDES)
    assert [info.number for info in matrix_scenarios()] == [n for n, info in SCENARIOS.items() if info.isolation]
    for claim in known.values():
        assert list(claim.cells) == list(COLUMNS)
        assert claim.why.endswith(".") and len(claim.why) > 80


def test_a_cell_is_named_scenario_level_handler() -> None:
    """`--show 3/serializable/buggy` names one cell; anything else is one line listing what it could be."""
    assert CellId.parse("3/serializable/buggy") == CellId(3, "serializable", "buggy")
    assert str(CellId.parse("4/serializable+retry/fixed")) == "4/serializable+retry/fixed"
    with pytest.raises(Exception, match=r"no cell '2/serializable/buggy'.*SCENARIO one of 1, 3, 4"):
        CellId.parse("2/serializable/buggy")


async def test_the_retry_turns_every_saved_delivery_into_a_double_apply(workspace: Workspace) -> None:
    """Scenario 4's buggy consumer, retried on 40001 at SERIALIZABLE: every interleaving applies the event twice."""
    plain = await explore_cell(recording(), workspace, CellId(4, "serializable", "buggy"))
    retried = await explore_cell(recording(), workspace, CellId(4, RETRIED, "buggy"))
    assert 0 < plain.failing < plain.runs  # the 40001 saved some interleavings...
    assert plain.failing + plain.raised["40001"] == plain.runs  # ...exactly those in which it was raised
    assert retried.failing == retried.runs  # and the retry loses every one of them
    assert retried.answers == {"retried, acked": retried.raised["40001"]}


async def test_matrix_prints_the_table_the_claims_and_exits_0(workspace: Workspace) -> None:
    """`lab matrix 1`: a row per handler, a column per level, the why of each row, and exit 0 (all as claimed)."""
    console = recording()
    assert await matrix_journey(console, workspace, [scenario(1)]) == 0
    output = console.export_text()
    for column in COLUMNS:
        assert column_title(column).split(",")[0] in output
    assert "✗ double charge" in output and "✓ holds" in output
    for side in SIDES:
        assert f"1 {side}: {claims()[1, side].why[:60]}" in output.replace("\n", " ")
    assert "unexpected" not in output


async def test_a_cell_unlike_its_claim_is_reported_and_exits_1(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim the runs contradict is named with what came out instead; the exit code says the lab was surprised."""
    known = claims()
    known[1, "fixed"].cells["read-committed"] = "double charge"
    monkeypatch.setattr(matrix, "claims", lambda: known)
    console = recording()
    assert await show_cell(console, workspace, CellId(1, "read-committed", "fixed")) == 1
    assert "unexpected 1/read-committed/fixed: holds (lab/journeys/matrix.toml expects double charge)" in (
        console.export_text()
    )


async def test_show_prints_the_smallest_failing_run_and_the_smallest_that_raised(workspace: Workspace) -> None:
    """`--show 4/repeatable-read/buggy`: the sequential redelivery that no level stops, then the 40001 run."""
    console = recording()
    assert await show_cell(console, workspace, CellId(4, "repeatable-read", "buggy")) == 0
    output = re.sub(r"\s+", " ", console.export_text())
    assert "4/repeatable-read/buggy: the smallest failing run (1 switch between sessions)" in output
    assert "the smallest run in which PostgreSQL raised it" in output
    assert "ERROR: could not serialize access due to concurrent update" in output
    assert "✗ anomaly: event e1 applied 2 times" in output


def test_the_readme_shows_the_claimed_matrix_with_a_why_per_row() -> None:
    """README's table is matrix.toml: each row's cells and its reason, so the page cannot drift from what runs."""
    readme = (ROOT / "README.md").read_text()
    for (number, side), claim in claims().items():
        title = SCENARIOS[number].title.lower()
        cells = " | ".join(_mark(claim.cells[column]) for column in COLUMNS)
        assert f"| {number} {title} | {side} | {cells} |" in readme
        assert claim.why in re.sub(r"\s+", " ", readme)


def _mark(summary: str) -> str:
    return ("✓ " if summary.startswith("holds") else "✗ ") + summary
