"""The pytest plugin: the example app is red on its buggy version and green on its fix, and the fixtures keep
their promises (a schema of the test's own, dropped after it; a failure that is the lab's report; a pass
that says what was tried; loud misuse).

Each test runs a test file through pytester in this process, on this session's server
(``LAB_DATABASE_URL``), so that no second server is started.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from lab.plugin.fixture import _service_name, on_a_private_loop
from lab.postgres.provision import Postgres
from lab.postgres.workspace import Creator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "orders"
INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.Pytester]:
    """A pytester whose runs use this session's server, and which leaves no schema behind on it."""
    monkeypatch.setenv("LAB_DATABASE_URL", postgres.dsn)
    monkeypatch.setenv("COLUMNS", "100")
    before = _lab_schemas(postgres.dsn)
    yield pytester
    assert _lab_schemas(postgres.dsn) <= before, "an inner run left a schema behind"


def _lab_schemas(dsn: str) -> set[str]:
    async def names() -> set[str]:
        conn = await asyncpg.connect(dsn)
        try:
            return {r["nspname"] for r in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname ~ '^lab_'")}
        finally:
            await conn.close()

    return on_a_private_loop(names)


def _outcomes(result: pytest.RunResult) -> dict[str, str]:
    """Each test's id and how it ended, read from pytest's own report objects."""
    reports = result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    ended: dict[str, str] = {}
    for report in reports:
        name = report.nodeid.split("::")[-1]
        if report.when == "call" or report.outcome != "passed":
            ended[name] = "error" if report.when != "call" and report.failed else report.outcome
    return ended


def test_the_example_app_is_red_on_its_buggy_version_and_green_on_its_fix(inner: pytest.Pytester) -> None:
    """Every attack on the order service finds its race in buggy/ (with the lab's report) and holds on fixed/."""
    shutil.copytree(EXAMPLE, inner.path, dirs_exist_ok=True)
    result = inner.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    tests = ["a_retried_order_is_made_and_charged_once", "an_order_survives_a_crash_and_its_retry",
             "many_retries_at_once_make_one_order", "a_redelivered_event_reserves_once"]
    expected = {f"test_{t}[{v}]": "failed" if v == "buggy" else "passed" for t in tests for v in ("buggy", "fixed")}
    assert _outcomes(result) == expected
    out = result.stdout.str()
    # The smallest failing interleaving, as a timeline: both requests read "no row", both insert, both charge.
    race = _section(out, "test_a_retried_order_is_made_and_charged_once[buggy]")
    assert re.search(r"every interleaving of 2 duplicate requests: \d+ of the \d+ interleavings tried broke", race)
    assert "The smallest failing run (8 steps, 1 preemption):" in race
    assert race.count("→ (no row)") == 2 and "idempotency_key='order-1'" in race and "→ 'ch_2'" in race
    assert "✗ anomaly: request r-1 made 2 orders" in race
    assert "Traceback" not in race and "test_orders.py:" not in race  # the lab's report, not a stack
    crash = _section(out, "test_an_order_survives_a_crash_and_its_retry[buggy]")
    assert "✗ crash: backend terminated" in crash and "✗ anomaly: order 1 (r-1) was never paid" in crash
    stress = _section(out, "test_many_retries_at_once_make_one_order[buggy]")
    assert re.search(r"stress: 2 requests released together: \d+ of 20 trials \(\d+%\) broke the invariant", stress)
    inbox = _section(out, "test_a_redelivered_event_reserves_once[buggy]")
    assert "one message delivered to 2 consumers at once" in inbox and "✗ anomaly: book reserved 4, expected 2" in inbox
    held = r"Held before it in this test:\n  crashes at every step boundary .*: \d+ runs, every one held"
    assert re.search(held, inbox)
    # A green test says what it proved.
    summary = out[out.index("= idempotency lab ="):]
    assert "postgres: LAB_DATABASE_URL at " in summary
    assert re.search(r"✓ tests/test_orders.py::test_a_retried_order_is_made_and_charged_once\[fixed\]\n"
                     r"    every interleaving of 2 duplicate requests: \d+ interleavings, every one held", summary)
    assert re.search(r"crash points, then the client's retry: \d+ crash points, every one held", summary)
    assert "stress: 10 requests released together: 20 trials, every one held" in summary


def _section(out: str, test: str) -> str:
    """One failure's block of pytest's report."""
    start = out.index(f"_ {test} _")
    end = min((i for i in (out.find("\n___", start + 1), out.find("\n===", start + 1)) if i != -1), default=len(out))
    return out[start:end]


FIXTURES = '''
import asyncio
from pathlib import Path

import pytest

SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, name text UNIQUE NOT NULL);
CREATE TABLE visits (id bigserial PRIMARY KEY, customer_id int REFERENCES customers, note text);
INSERT INTO customers (name) VALUES ('ada');
"""


@pytest.fixture
def lab_schema(tmp_path):
    (tmp_path / "001.sql").write_text(SCHEMA)
    return tmp_path


async def visit(db, note="hi"):
    await db.execute("INSERT INTO visits (customer_id, note) VALUES (1, $1)", note)


async def visits_at_most(db):
    count = await db.fetchval("SELECT count(*) FROM visits")
    assert count <= 1, f"{count} visits"


async def test_the_schema_is_the_test_s_own_and_holds_what_the_migrations_and_the_test_put_there(lab, lab_database):
    conn = await lab_database.connect()
    try:
        await conn.execute("INSERT INTO customers (name) VALUES ('grace')")
        seen = []

        async def names(db):
            seen.append(await db.fetchval("SELECT string_agg(name, ',' ORDER BY id) FROM customers"))

        await lab.every_interleaving(names, sessions=2, invariant=lambda db: [])
        assert set(seen) == {"ada,grace"}
        assert await conn.fetchval("SELECT count(*) FROM visits") == 0  # the attack put the tables back
        assert await conn.fetchval("SELECT current_schema()") == lab_database.schema
    finally:
        await conn.close()


async def test_an_assert_in_the_invariant_is_the_anomaly(lab):
    await lab.every_interleaving(visit, invariant=visits_at_most)


async def test_a_passing_attack_is_recorded(lab):
    await lab.every_interleaving(visit, sessions=1, invariant=visits_at_most)


async def test_the_handler_may_be_given_one_connection(lab):
    async def in_a_transaction(conn):
        async with conn.transaction():
            await visit(conn)

    async def gave_up(conn):
        return None

    await lab.crash_points(in_a_transaction, db="connection", invariant=visits_at_most, retry=gave_up)


async def visit_twice(db):  # two steps each: more than one class of interleavings, even reduced
    await visit(db)
    await visit(db, "again")


async def test_a_budget_too_small_is_not_a_pass(lab):
    await lab.every_interleaving(visit_twice, invariant=lambda db: [], limit=1)


async def test_an_attack_never_awaited_fails_the_test(lab):
    lab.every_interleaving(visit, invariant=visits_at_most)


async def test_a_handler_that_waits_on_what_the_lab_cannot_see_is_one_line(lab):
    async def sleepy(db):
        await asyncio.sleep(30)

    await lab.every_interleaving(sleepy, invariant=visits_at_most, step_timeout=0.2)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_module_scoped_loop_will_do(lab):
    await lab.every_interleaving(visit, sessions=1, invariant=visits_at_most)


@pytest.mark.asyncio(loop_scope="session")
async def test_so_will_a_session_scoped_one(lab):
    await lab.every_interleaving(visit, sessions=1, invariant=visits_at_most)


async def test_calls_to_a_fake_and_to_the_lab_s_provider_reach_the_invariant(lab):
    class FakeMailer:
        def __init__(self):
            self.sent = 0

        async def send(self, to):
            self.sent += 1
            return f"mail {self.sent}"

    mailer = lab.fake(FakeMailer)
    calls_seen = []

    async def welcome(db):
        await mailer.send("ada")
        await lab.provider.charge("ada", 500, idempotency_key="k1")

    async def record(db, calls):
        calls_seen.append([(c.session, c.name, c.args, dict(c.kwargs), c.result) for c in calls])

    await lab.every_interleaving(welcome, sessions=1, invariant=record)
    assert calls_seen == [[
        ("T1", "provider.charge", ("ada", 500), {"idempotency_key": "k1"}, "ch_1"),
        ("T1", "mailer.send", ("ada",), {}, "mail 1"),
    ]]
'''


def test_the_fixtures_keep_their_promises(inner: pytest.Pytester) -> None:
    """Schema, kept state, connection mode, loop scopes, fakes and misuse: each test ends as it should; without a
    lab_schema, or with one that does not install, a test says so in one line."""
    inner.makeini(INI)
    inner.makepyfile(
        test_fixtures=FIXTURES,
        test_none="async def test_x(lab):\n    pass\n",
        test_broken="import pytest\n\n@pytest.fixture\ndef lab_schema():\n    return 'CREATE TABLE oops ('\n\n"
        "async def test_y(lab):\n    pass\n",
    )
    result = inner.runpytest("-p", "no:cacheprovider", "-rP")
    assert _outcomes(result) == {
        "test_the_schema_is_the_test_s_own_and_holds_what_the_migrations_and_the_test_put_there": "passed",
        "test_an_assert_in_the_invariant_is_the_anomaly": "failed",
        "test_a_passing_attack_is_recorded": "passed",
        "test_the_handler_may_be_given_one_connection": "passed",
        "test_a_budget_too_small_is_not_a_pass": "failed",
        "test_an_attack_never_awaited_fails_the_test": "error",
        "test_a_handler_that_waits_on_what_the_lab_cannot_see_is_one_line": "failed",
        "test_a_module_scoped_loop_will_do": "passed",
        "test_so_will_a_session_scoped_one": "passed",
        "test_calls_to_a_fake_and_to_the_lab_s_provider_reach_the_invariant": "passed",
        "test_x": "error",
        "test_y": "error",
    }
    out = result.stdout.str()
    assert "✗ anomaly: 2 visits" in out
    assert "every interleaving of 1 request: 1 interleaving, it held" in out  # -rP shows a pass's section
    assert "every interleaving of 2 duplicate requests: not proven. 1 interleaving held, and there are more" in out
    assert "lab.every_interleaving(...) was never awaited, so it attacked nothing" in out
    assert "T1 made no progress for 0.2 s" in out and "the handler waits on something the lab cannot see" in out
    assert "crash points, then the client's retry: 4 crash points, every one held" in out
    result.stdout.fnmatch_lines([
        "*_ ERROR at setup of test_y _*",
        "lab_schema does not install: PostgresSyntaxError: syntax error at end of input",
        "*_ ERROR at setup of test_x _*",
        "the lab needs your schema: define a fixture named lab_schema (in conftest.py)*",
    ])


def test_a_fake_is_named_after_its_class() -> None:
    """The timeline calls FakePayments 'payments', PaymentGateway 'payment_gateway'."""
    class FakePayments: ...
    class PaymentGateway: ...
    assert [_service_name(FakePayments), _service_name(PaymentGateway)] == ["payments", "payment_gateway"]


def test_a_killed_lab_s_schema_is_reaped_and_said_under_the_results_not_in_a_test_s_output(
    inner: pytest.Pytester, postgres: Postgres
) -> None:
    """The line about a killed lab's schemas belongs to the run: as captured stderr it would land in the report of
    whichever test set up first, and change what a failing test prints with what other runs left on the server."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    started = psutil.Process(child.pid).create_time()
    child.communicate(b"")
    dead = dataclasses.replace(Creator.me(), pid=child.pid, started=started)

    async def plant() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        try:
            await conn.execute("CREATE SCHEMA lab_0badf00d")
            await conn.execute(f"COMMENT ON SCHEMA lab_0badf00d IS '{dead.comment()}'")
        finally:
            await conn.close()

    on_a_private_loop(plant)
    inner.makeini(INI)
    inner.makepyfile(test_red=FIXTURES.split("\n\n\nasync def test_")[0] + "\n\n\nasync def test_red(lab):\n"
                     "    await lab.every_interleaving(visit, invariant=visits_at_most)\n")
    result = inner.runpytest("-p", "no:cacheprovider")
    assert _outcomes(result) == {"test_red": "failed"}
    out = result.stdout.str()
    assert "Captured stderr" not in out
    summary = out[out.index("= idempotency lab ="):]
    assert re.search(r"\nlab: removed 1 schema left by a lab that is gone \(.*\): lab_0badf00d\n", summary)
    assert "lab_0badf00d" not in _lab_schemas(postgres.dsn)
