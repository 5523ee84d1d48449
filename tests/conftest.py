"""Shared fixtures: one real PostgreSQL for the whole run, one private workspace per test module.

The server is whatever the lab itself would pick (``LAB_DATABASE_URL``, else Docker, else the
embedded server), so the suite runs against the same kind of database a user gets.
"""

from collections.abc import AsyncIterator, Iterator

import pytest
from sizing import USED

from lab.postgres.provision import Postgres, provision
from lab.postgres.workspace import Workspace

pytest_plugins = ["pytester"]  # tests/test_plugin.py runs test files through the lab's own pytest plugin


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with provision() as pg:
        yield pg


@pytest.fixture(scope="module")
async def workspace(postgres: Postgres) -> AsyncIterator[Workspace]:
    ws = await Workspace.open(postgres.dsn)
    try:
        yield ws
    finally:
        await ws.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say what the tests that open many sessions used on this server (tests/sizing.py)."""
    if USED:
        terminalreporter.section("sessions sized to the server's free connections")
        for line in USED:
            terminalreporter.write_line(line)
