"""What pytest loads from the ``pytest11`` entry point: the lab's fixtures, and how its tests report.

Fixtures, in the ecosystem's habits (pytest-postgresql's process and client fixtures, pytest-django's
overridable set-up fixture):

``lab_postgres``  session: the server, resolved as the lab resolves it (LAB_DATABASE_URL | container | embedded)
``lab_schema``    yours to override: your schema as SQL, a .sql file or a folder of them, or your migrations
``lab_database``  function: a fresh schema of its own, migrated, handed to the test, dropped after it
``lab``           function: the attacks (every interleaving, stress, crash points, redelivery) on your handler

None of them holds a connection: each attack opens its own on the event loop that awaits it and closes
them before it returns, so the tests may run on any pytest-asyncio loop scope. Importing this module
costs next to nothing (pytest imports it in every run of every project where the lab is installed);
the lab itself is imported by the fixtures, when a test asks for one.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lab.plugin.fixture import Database, Lab
    from lab.postgres.provision import Postgres

SECTION = "idempotency lab"
_POSTGRES_LINE = pytest.StashKey[str]()
_REAPED_LINES = pytest.StashKey[list[str]]()


class InvariantBroken(AssertionError):
    """An attack found a run that broke the invariant; the message is the lab's report of it."""


class NotProven(AssertionError):
    """An exploration ran out of its budget before every interleaving was run, and none broke the invariant."""


@pytest.fixture(scope="session")
def lab_postgres(pytestconfig: pytest.Config) -> Iterator[Postgres]:
    """The lab's server for the whole run: LAB_DATABASE_URL, else a container, else the embedded server."""
    from lab.errors import LabError
    from lab.plugin.fixture import on_a_private_loop
    from lab.postgres.provision import provision, verify

    problem = ""
    try:
        with provision() as pg:
            on_a_private_loop(lambda: verify(pg))  # an unreachable server is one line, before any test runs on it
            pytestconfig.stash[_POSTGRES_LINE] = pg.description
            yield pg
    except LabError as exc:
        problem = str(exc)
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.fixture
def lab_schema() -> object:
    """Override this fixture with your schema: SQL text, a path to a .sql file or to a folder of them
    (applied in name order), or a callable that runs your migrations on the asyncpg connection it is given."""
    pytest.fail(
        "the lab needs your schema: define a fixture named lab_schema (in conftest.py) that returns your SQL,"
        " a path to your migrations, or a function that runs them on a connection (see docs/PYTEST.md)",
        pytrace=False,
    )


@pytest.fixture
def lab_database(lab_postgres: Postgres, lab_schema: object, pytestconfig: pytest.Config) -> Iterator[Database]:
    """A schema of the test's own, migrated before the test and dropped after it, whatever the test did."""
    from lab.plugin.fixture import create_database, drop_database

    reaped = pytestconfig.stash.setdefault(_REAPED_LINES, [])
    database = create_database(lab_postgres.dsn, lab_schema, notify=lambda line: reaped.append(f"lab: {line}"))
    try:
        yield database
    finally:
        drop_database(database)


@pytest.fixture
def lab(lab_database: Database, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The lab's attacks on your handler; await each one (``await lab.every_interleaving(...)``)."""
    from lab.plugin.fixture import Lab

    try:
        width = max(request.config.get_terminal_writer().fullwidth, 60)  # the terminal's, as pytest draws it
    except AttributeError:  # no terminal reporter (-p no:terminal)
        width = 120
    attacker = Lab(lab_database, width=width)
    request.node.stash[_TRIED] = attacker.tried
    yield attacker
    attacker.finish()


_TRIED = pytest.StashKey[list[Any]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing attack shows the lab's report alone (no traceback); every test says what the lab tried."""
    report: pytest.TestReport = yield
    if report.when != "call":
        return report
    tried = item.stash.get(_TRIED, [])
    if tried:
        from lab.plugin.report import summary

        said = "\n".join(summary(t) for t in tried)
        report.user_properties.append((SECTION, said))
        if report.passed:  # a failure's message already says it (pytest -rP shows a passing test's sections)
            report.sections.append((SECTION, said))
    if call.excinfo is not None and isinstance(call.excinfo.value, InvariantBroken | NotProven):
        report.longrepr = str(call.excinfo.value)
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Under the results: which server the lab used, and what it tried in each test that used it."""
    lines = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.getreports(outcome):
            said = dict(report.user_properties).get(SECTION)
            if said:
                mark = "✓" if outcome == "passed" else "✗"
                lines.append(f"{mark} {report.nodeid}")
                lines += [f"    {line}" for line in said.splitlines()]
    reaped = config.stash.get(_REAPED_LINES, [])
    if not lines and not reaped:
        return
    terminalreporter.section(SECTION)
    if line := config.stash.get(_POSTGRES_LINE, ""):
        terminalreporter.line(line)
    for line in reaped:
        terminalreporter.line(line)
    for line in lines:
        terminalreporter.line(line)
