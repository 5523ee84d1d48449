"""Shared fixtures: one real PostgreSQL for the whole run, one private workspace per test module.

The server is whatever the lab itself would pick (``LAB_DATABASE_URL``, else Docker, else the
embedded server), so the suite runs against the same kind of database a user gets.
"""

from collections.abc import AsyncIterator, Iterator

import pytest

from lab.postgres import Postgres, provision
from lab.workspace import Workspace


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
