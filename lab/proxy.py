"""What a handler receives as ``db``: asyncpg ``Pool``'s API, with every statement a scheduled step.

Handlers are plain asyncpg code. They call ``db.fetchrow(...)`` or
``async with db.acquire() as conn: async with conn.transaction(): ...`` exactly as against a pool;
the proxy routes each statement (``BEGIN`` and ``COMMIT`` included) through the scheduler so it
waits for its turn and lands on the timeline with its parameters and its result.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from lab.scheduler import Scheduler

Connector = Callable[[], Awaitable[asyncpg.Connection]]


def _sql_text(sql: str, args: Sequence[Any]) -> str:
    text = re.sub(r"\s+", " ", sql).strip()
    if args:
        text += "  -- " + ", ".join(f"${i}={_short(a)}" for i, a in enumerate(args, 1))
    return text


def _short(value: Any, limit: int = 16) -> str:
    if isinstance(value, datetime):
        return value.strftime("%H:%M:%S")  # a lease on the lab clock (lab.clock) reads as time into the run
    shown = repr(value.decode() if isinstance(value, bytes) else value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…'"


def _render_row(row: asyncpg.Record | None) -> str:
    if row is None:
        return "(no row)"
    return "(" + ", ".join(f"{k}={_value(v)}" for k, v in row.items()) + ")"


def _value(value: Any) -> str:
    return "NULL" if value is None else _short(value, 32)


def _render_rows(rows: list[asyncpg.Record]) -> str:
    if len(rows) <= 2:
        return "[" + ", ".join(_render_row(r) for r in rows) + "]"
    return f"{len(rows)} rows"


class StepConnection:
    """One backend of a session: asyncpg ``Connection``'s query methods, each call one step."""

    def __init__(self, conn: asyncpg.Connection, scheduler: Scheduler | None, latency: float = 0.0) -> None:
        self._conn = conn
        self._scheduler = scheduler
        self._latency = latency
        self.in_use = False

    @property
    def raw(self) -> asyncpg.Connection:
        return self._conn

    async def _step(self, sql: str, args: Sequence[Any], run: Callable[[], Awaitable[Any]], render: Any) -> Any:
        if self._scheduler is None:
            if self._latency:
                await asyncio.sleep(self._latency)  # the network between app and database (stress mode only)
            return await run()
        pid = self._conn.get_server_pid()
        self._scheduler.register_pid(pid)
        return await self._scheduler.step(_sql_text(sql, args), run, pid=pid, render=render)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._step(sql, args, lambda: self._conn.fetch(sql, *args), _render_rows)
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._step(
            sql, args, lambda: self._conn.fetchrow(sql, *args), _render_row
        )
        return row

    async def fetchval(self, sql: str, *args: Any, column: int = 0) -> Any:
        return await self._step(sql, args, lambda: self._conn.fetchval(sql, *args, column=column), _value)

    async def execute(self, sql: str, *args: Any) -> str:
        status: str = await self._step(sql, args, lambda: self._conn.execute(sql, *args), str)
        return status

    @asynccontextmanager
    async def transaction(self, *, isolation: str | None = None) -> AsyncIterator[None]:
        """BEGIN, then COMMIT on success or ROLLBACK on an exception: three visible steps."""
        begin = "BEGIN" if isolation is None else f"BEGIN ISOLATION LEVEL {isolation.replace('_', ' ').upper()}"
        await self.execute(begin)
        try:
            yield
        except BaseException:
            if not self._conn.is_closed():
                await self.execute("ROLLBACK")
            raise
        await self.execute("COMMIT")


class SessionDb:
    """The pool a session sees. Its backends persist across replays, so replays cost no connects."""

    def __init__(
        self, connections: list[StepConnection], connect: Connector, scheduler: Scheduler | None, latency: float = 0.0
    ) -> None:
        self._connections = connections
        self._connect = connect
        self._scheduler = scheduler
        self._latency = latency

    async def _free(self) -> StepConnection:
        for conn in self._connections:
            if not conn.in_use:
                return conn
        conn = StepConnection(await self._connect(), self._scheduler, self._latency)
        self._connections.append(conn)
        return conn

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[StepConnection]:
        conn = await self._free()
        conn.in_use = True
        try:
            yield conn
        finally:
            conn.in_use = False

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await (await self._free()).fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await (await self._free()).fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any, column: int = 0) -> Any:
        return await (await self._free()).fetchval(sql, *args, column=column)

    async def execute(self, sql: str, *args: Any) -> str:
        return await (await self._free()).execute(sql, *args)


class ConnectionBank:
    """Backends kept per session name across runs; each run starts them clean (no open transaction)."""

    def __init__(self, connect: Connector) -> None:
        self._connect = connect
        self._by_session: dict[str, list[asyncpg.Connection]] = {}

    async def db_for(self, session: str, scheduler: Scheduler | None, latency: float = 0.0) -> SessionDb:
        """The session's db; ``latency`` (seconds, unscheduled runs only) is waited before each statement."""
        kept = self._by_session.setdefault(session, [])
        alive = []
        for conn in kept:
            if conn.is_closed():
                continue
            try:
                # A crashed session's backend may be gone while the client has not noticed yet: ask.
                await conn.execute("ROLLBACK" if conn.is_in_transaction() else "SELECT 1")
            # InternalClientError: the client read the backend's FATAL but not yet its EOF (a crash a moment
            # ago), and refuses any query while it waits for a ReadyForQuery that will never come.
            except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError):
                conn.terminate()
                continue
            alive.append(conn)
        if not alive:
            alive.append(await self._connect())
        kept[:] = alive
        wrapped = [StepConnection(c, scheduler, latency) for c in alive]
        return SessionDb(wrapped, self._new(session), scheduler, latency)

    def _new(self, session: str) -> Connector:
        async def connect() -> asyncpg.Connection:
            conn = await self._connect()
            self._by_session[session].append(conn)
            return conn

        return connect

    async def close(self) -> None:
        for conns in self._by_session.values():
            for conn in conns:
                if not conn.is_closed():
                    conn.terminate()
        self._by_session.clear()
