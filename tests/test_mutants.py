"""make mutants: the mutations it makes are the ones it names, and its list of equivalent mutants is sound.

No database here: the mutants are only generated and read back (``make mutants`` grades them).
"""

from pathlib import Path
from typing import Any

import pytest
from pglast import parse_sql
from pglast.stream import RawStream

from lab.mutants import EQUIVALENT, graded_lines, isolation_mutants, load_equivalent, reprinted, sql_mutants
from lab.registry import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent


def source(number: int) -> str:
    return Path(str(SCENARIOS[number].module("fixed").__file__)).read_text()


def statements(text: str) -> list[str]:
    """Every statement the mutated file sends, as PostgreSQL's parser prints it back."""
    import ast

    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("fetchrow", "fetchval", "execute"):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                statement: Any = parse_sql(first.value)[0].stmt
                found.append(str(RawStream()(statement)))
    return found


def test_scenario_1s_claim_becomes_a_plain_insert_and_a_do_update() -> None:
    """ON CONFLICT DO NOTHING is mutated into a plain INSERT and into DO UPDATE, RETURNING is dropped, once each."""
    mutants = {m.ident.split(": ", 1)[1]: m for m in sql_mutants(1, source(1))}
    assert set(mutants) >= {"ON CONFLICT DO NOTHING -> plain INSERT", "drop RETURNING", "WHERE: drop `key = $1`",
                            "ON CONFLICT DO NOTHING -> DO UPDATE SET key = EXCLUDED.key"}
    plain = statements(mutants["ON CONFLICT DO NOTHING -> plain INSERT"].source)
    assert any(s.startswith("INSERT INTO idempotency_keys") and "ON CONFLICT" not in s for s in plain)
    update = statements(mutants["ON CONFLICT DO NOTHING -> DO UPDATE SET key = EXCLUDED.key"].source)
    assert any("ON CONFLICT (key) DO UPDATE SET key = excluded.key RETURNING key" in s for s in update)


def test_scenario_3s_claim_loses_each_conjunct_and_each_disjunct_in_turn() -> None:
    """Every AND and OR in the claim's WHERE gives one mutant per argument, and only that argument is neutral."""
    dropped = [m for m in sql_mutants(3, source(3)) if "ON CONFLICT ... WHERE: drop" in m.ident]
    names = [m.ident.rsplit("drop ", 1)[1] for m in dropped]
    assert names == [
        "conjunct `k.fingerprint = $2`",
        "conjunct `k.status = 'failed' OR (k.status = 'in_progress' AND k.lease_until <= $4)`",
        "disjunct `k.status = 'failed'`",
        "disjunct `k.status = 'in_progress' AND k.lease_until <= $4`",
        "conjunct `k.status = 'in_progress'`",
        "conjunct `k.lease_until <= $4`",
    ]
    without_lease = statements(dropped[-1].source)  # always true in its place, so $4 keeps its type
    assert any("(k.status = 'in_progress' AND (k.lease_until <= $4 IS NOT NULL OR TRUE))) RETURNING" in s
               for s in without_lease)


def test_every_transaction_runs_at_each_other_isolation_level() -> None:
    """Scenario 4's transaction() (READ COMMITTED) is mutated to REPEATABLE READ and to SERIALIZABLE."""
    mutants = list(isolation_mutants(4, source(4)))
    assert [m.ident.rsplit("-> ", 1)[1] for m in mutants] == ["repeatable_read", "serializable"]
    assert "conn.transaction(isolation='serializable')" in mutants[1].source


@pytest.mark.parametrize("number", sorted(SCENARIOS))
def test_the_control_changes_no_statement(number: int) -> None:
    """Printed back by pglast, every statement of a fix parses to the same tree: the control mutant is the fix."""
    assert statements(reprinted(source(number))) == statements(source(number))


def test_declarations_read_from_scenarios_are_not_mutated() -> None:
    """CANONICAL, INVARIANT and CRASH are the scenario's to the grader, so a fix's copies are never mutated."""
    text = source(3)
    lines = text.splitlines()
    graded = graded_lines(text)
    for name in ("CANONICAL", "INVARIANT", "CRASH"):
        line = next(i for i, t in enumerate(lines, 1) if t.startswith(name))
        assert line not in graded
    assert next(i for i, t in enumerate(lines, 1) if t.startswith("LEASE_SECONDS")) in graded


def test_every_equivalent_mutant_says_why() -> None:
    """The committed list names scenarios that exist, and gives each mutant a reason of its own words."""
    listed = load_equivalent(EQUIVALENT)
    assert set(listed) <= set(SCENARIOS)
    assert all(len(why) > 40 for mutants in listed.values() for why in mutants.values())
