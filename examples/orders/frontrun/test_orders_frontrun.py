"""The order service's first test (a retried POST /orders, two requests in every interleaving), for frontrun 0.7.0.

Kept to compare the lab's plugin with the closest tool a user has today (docs/PYTEST.md): not part
of the app's suite (its pyproject's testpaths name tests/ only). Run it where frontrun is installed,
against the server LAB_DATABASE_URL names (compare.sh does both). frontrun calls its setup and its
invariant synchronously inside the running event loop, so their database work runs on a loop of its
own, in a thread. Two ways to give the handler its db: the asyncpg pool it gets in production, and
one plain connection per request behind a pool's acquire().
"""

import asyncio
import contextlib
import importlib.util
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import frontrun
import pytest

APP = Path(__file__).resolve().parent.parent
DSN = os.environ["LAB_DATABASE_URL"]
ON_SCHEMA = {"server_settings": {"search_path": "frontrun_orders"}}


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FakePayments = load(APP / "tests" / "conftest.py", "orders_conftest").FakePayments


def blocking(make: Callable[[], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        return await make()

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, run()).result()


async def query(sql: str) -> Any:
    conn = await asyncpg.connect(DSN, **ON_SCHEMA)
    try:
        return await conn.fetch(sql) if sql.startswith("SELECT") else await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["buggy", "fixed"])
def orders(request: pytest.FixtureRequest) -> AsyncIterator[ModuleType]:
    return load(APP / request.param / "orders.py", f"orders_{request.param}")


@pytest.fixture
async def schema(orders: ModuleType) -> AsyncIterator[None]:
    admin = await asyncpg.connect(DSN)
    await admin.execute("DROP SCHEMA IF EXISTS frontrun_orders CASCADE; CREATE SCHEMA frontrun_orders")
    conn = await asyncpg.connect(DSN, **ON_SCHEMA)
    await orders.migrate(conn)
    await conn.close()
    yield
    await admin.execute("DROP SCHEMA frontrun_orders CASCADE")
    await admin.close()


class OneConnection:
    """A pool of one plain connection: what a handler that calls pool.acquire() needs, without asyncpg's pool."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        yield self.conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


class State:
    def __init__(self, dbs: list[Any]) -> None:
        self.dbs = list(dbs)
        self.payments = FakePayments()


async def explore(orders: ModuleType, dbs: list[Any]) -> None:
    def setup() -> State:
        blocking(lambda: query("TRUNCATE orders RESTART IDENTITY"))
        return State(dbs)

    async def order(state: State) -> None:
        await orders.create_order(state.dbs.pop(), state.payments, "r-1", "ada", "book", 1500)

    def one_paid_order_per_request(state: State) -> bool:
        rows = blocking(lambda: query("SELECT request_id, status, charge_id FROM orders"))
        charged = set(state.payments.charges.values())
        return (len(rows) == len({r["request_id"] for r in rows}) and all(r["status"] == "paid" for r in rows)
                and charged <= {r["charge_id"] for r in rows})

    result = await frontrun.explore(setup=setup, workers=order, count=2, invariant=one_paid_order_per_request)
    result.assert_holds()


async def test_given_the_pool(orders: ModuleType, schema: None) -> None:
    async with asyncpg.create_pool(DSN, min_size=2, max_size=2, **ON_SCHEMA) as pool:
        await explore(orders, [pool, pool])


async def test_given_one_connection_each(orders: ModuleType, schema: None) -> None:
    conns = [await asyncpg.connect(DSN, **ON_SCHEMA) for _ in range(2)]
    try:
        await explore(orders, [OneConnection(conn) for conn in conns])
    finally:
        for conn in conns:
            await conn.close()
