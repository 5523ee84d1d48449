"""What a handler receives as ``db``: an asyncpg ``Pool`` in every observable way, each statement a step.

Handlers are plain asyncpg code, so the db they get must behave as asyncpg's does, or the grader judges
another program than the one a learner deploys: a nested ``conn.transaction()`` is a SAVEPOINT, a
connection goes back to the pool reset (its open transaction rolled back, its session advisory locks
released), a released connection refuses every call. The pool, its connections, and what they hand out
(:mod:`lab.engine.resources`: transactions, prepared statements, cursors) copy asyncpg's own code
(``pool.py``, ``connection.py``, ``transaction.py``, ``cursor.py``), its error messages included;
``tests/test_proxy.py`` runs the same calls against a real asyncpg pool and this one and compares.

Every statement goes through one funnel, :meth:`StepConnection._step`: under a scheduler it waits for
its turn and lands on the timeline with its parameters and its result. What asyncpg sends on its own
when a connection is released (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``)
goes through it too, but runs at once inside the session's turn and is not drawn: it never waits on a
lock, and a learner did not write it. A ROLLBACK at release is drawn: it is the learner's open
transaction ending. What cannot be run with asyncpg's semantics is refused (:class:`Unsupported`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import asyncpg

from lab.engine.conflicts import Transactions
from lab.engine.resources import CursorFactory, PreparedStatement, Transaction
from lab.engine.scheduler import Scheduler
from lab.engine.trace import row_text, rows_text, statement_text, value_text
from lab.errors import LabError

Connector = Callable[[], Awaitable[asyncpg.Connection]]

#: asyncpg's default ``max_size``: an 11th connection held at once waits for one to be released.
POOL_SIZE = 10

#: What asyncpg's ``Connection.get_reset_query()`` returns against PostgreSQL, sent on every release.
RESET_QUERY = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"


class Unsupported(LabError):
    """A call the lab's db refuses rather than run with semantics other than asyncpg's: it cannot be graded."""


# Why each refused asyncpg method is refused: what a grader could not schedule, or could not replay.
_CALLBACKS = "its callbacks fire outside any step, so no schedule can order them"
_REUSED = "it changes the backend for good, and the lab replays every run on the same backends"
_COPY = "COPY streams rows between the handler's process and the server, outside the timeline's statements;" \
    " use executemany or INSERT ... SELECT"
_POOL_OWNED = "the lab owns the pool and its connections; release one with db.release(conn) or by leaving" \
    " `async with db.acquire()`"
WHY_REFUSED = {
    "add_listener": _CALLBACKS, "remove_listener": _CALLBACKS,
    "add_log_listener": _CALLBACKS, "remove_log_listener": _CALLBACKS,
    "add_termination_listener": _CALLBACKS, "remove_termination_listener": _CALLBACKS,
    "add_query_logger": _CALLBACKS, "remove_query_logger": _CALLBACKS, "query_logger": _CALLBACKS,
    "set_type_codec": _REUSED, "reset_type_codec": _REUSED, "set_builtin_type_codec": _REUSED,
    "reload_schema_state": _REUSED,
    "copy_from_table": _COPY, "copy_from_query": _COPY, "copy_to_table": _COPY, "copy_records_to_table": _COPY,
    "close": _POOL_OWNED, "terminate": _POOL_OWNED, "reset": _POOL_OWNED, "expire_connections": _POOL_OWNED,
    "set_connect_args": _POOL_OWNED,
    "explain": "EXPLAIN is not a request's work (and with analyze=True asyncpg runs the statement in a"
    " transaction block of its own)",
}  # fmt: skip


def refusal(owner: str, method: str) -> str:
    why = WHY_REFUSED.get(method, "the lab grades what a request handler does with a pool, and this is not that")
    return f"asyncpg's {owner}.{method}() is not supported by the lab's db: {why}"


def _done(_: object) -> str:
    return "done"


class StepConnection:
    """One backend of a session for one run: every statement on it is one step, through :meth:`_step`.

    It also keeps what asyncpg keeps on a ``Connection``: the outermost ``transaction()`` block (nested
    ones are savepoints) and a counter for savepoint names, here per run so that replays read the same.
    """

    def __init__(self, conn: asyncpg.Connection, scheduler: Scheduler | None, latency: float = 0.0) -> None:
        self._conn = conn
        self._scheduler = scheduler
        self._latency = latency
        self._pid = conn.get_server_pid()  # asked once: a terminated client has no protocol left to ask
        self.in_use = False
        self.top_xact: Transaction | None = None
        self._ids = 0
        catalog = scheduler.catalog if scheduler is not None else None
        # What this backend's transaction wrote or locked: its COMMIT's footprint (lab.engine.conflicts).
        self._xact = Transactions(catalog, strong=scheduler.strong) if scheduler and catalog else None

    @property
    def raw(self) -> asyncpg.Connection:
        return self._conn

    async def _step(
        self,
        sql: str,
        args: Sequence[Any],
        run: Callable[[], Awaitable[Any]],
        render: Callable[[Any], str],
        *,
        shown: str | None = None,
        quiet: bool = False,
        many: bool = False,
    ) -> Any:
        """The one funnel every statement takes. ``sql`` is what is sent (``args`` its parameters, or for
        executemany/fetchmany the list of parameter sets); ``shown`` replaces its text on the timeline;
        ``quiet`` runs it inside the current turn, undrawn (asyncpg's own reset at release); ``many``: ``args``
        is a list of parameter sets."""
        if self._scheduler is None:
            if self._latency:
                await asyncio.sleep(self._latency)  # the network between app and database (stress mode only)
            return await run()
        self._scheduler.register_pid(self._pid)
        text = statement_text(sql, args) if shown is None else shown
        footprint = self._xact.footprint(sql, args, many=many) if self._xact is not None and not quiet else None
        return await self._scheduler.step(
            text, run, pid=self._pid, render=render, gated=not quiet, footprint=footprint
        )

    def unique_id(self, prefix: str) -> str:
        """asyncpg's ``Connection._get_unique_id``: the names it gives savepoints."""
        self._ids += 1
        return f"__asyncpg_{prefix}_{self._ids:x}__"

    # -- asyncpg's Connection query methods, each one step -----------------------------------------------

    async def fetch(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> list[asyncpg.Record]:
        conn = self._conn
        rows: list[asyncpg.Record] = await self._step(
            query, args, lambda: conn.fetch(query, *args, timeout=timeout, record_class=record_class), rows_text
        )
        return rows

    async def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> asyncpg.Record | None:
        conn = self._conn
        row: asyncpg.Record | None = await self._step(
            query, args, lambda: conn.fetchrow(query, *args, timeout=timeout, record_class=record_class), row_text
        )
        return row

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        conn = self._conn
        return await self._step(
            query, args, lambda: conn.fetchval(query, *args, column=column, timeout=timeout), value_text
        )

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        conn = self._conn
        status: str = await self._step(query, args, lambda: conn.execute(query, *args, timeout=timeout), str)
        return status

    async def executemany(self, command: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None) -> None:
        conn, sets = self._conn, list(args)
        await self._step(
            command, sets, lambda: conn.executemany(command, sets, timeout=timeout), _done,
            shown=f"{statement_text(command, ())}  -- executemany, {len(sets)} parameter sets", many=True,
        )

    async def fetchmany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None, record_class: Any = None
    ) -> list[asyncpg.Record]:
        conn, sets = self._conn, list(args)
        rows: list[asyncpg.Record] = await self._step(
            query, sets, lambda: conn.fetchmany(query, sets, timeout=timeout, record_class=record_class),
            rows_text, shown=f"{statement_text(query, ())}  -- fetchmany, {len(sets)} parameter sets", many=True,
        )
        return rows

    async def reset(self, timeout: float | None) -> None:
        """What asyncpg's pool does at release (``PoolConnectionHolder.release``, ``Connection.reset``)."""
        conn = self._conn
        if conn.is_closed():
            conn.terminate()
            return
        try:
            async with asyncio.timeout(timeout):
                if conn.is_in_transaction() or self.top_xact is not None:
                    self.top_xact = None
                    await self.execute("ROLLBACK")
                await self._step(RESET_QUERY, (), lambda: conn.execute(RESET_QUERY), str, quiet=True)
        except BaseException:
            conn.terminate()  # asyncpg: a reset that failed leaves a backend in an unknown state
            raise


class Connection:
    """asyncpg's ``PoolConnectionProxy``: one acquisition of a backend; released, it refuses every call."""

    def __init__(self, backend: StepConnection, pool: SessionDb, timeout: float | None) -> None:
        self._backend: StepConnection | None = backend
        self._pool = pool
        self._timeout = timeout  # asyncpg applies the acquire's timeout to the release by default

    def _live(self, method: str) -> StepConnection:
        if self._backend is None:
            raise asyncpg.InterfaceError(
                f"cannot call Connection.{method}(): connection has been released back to the pool"
            )
        return self._backend

    def _open(self, method: str) -> StepConnection:
        backend = self._live(method)
        if backend.raw.is_closed():
            raise asyncpg.InterfaceError("connection is closed")
        return backend

    def _detach(self) -> StepConnection | None:
        backend, self._backend = self._backend, None
        return backend

    def __repr__(self) -> str:
        state = " [released]" if self._backend is None else ""
        return f"<PoolConnectionProxy{state} {id(self):#x}>"

    async def fetch(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> list[asyncpg.Record]:
        return await self._live("fetch").fetch(query, *args, timeout=timeout, record_class=record_class)

    async def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> asyncpg.Record | None:
        return await self._live("fetchrow").fetchrow(query, *args, timeout=timeout, record_class=record_class)

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        return await self._live("fetchval").fetchval(query, *args, column=column, timeout=timeout)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        return await self._live("execute").execute(query, *args, timeout=timeout)

    async def executemany(self, command: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None) -> None:
        await self._live("executemany").executemany(command, args, timeout=timeout)

    async def fetchmany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None, record_class: Any = None
    ) -> list[asyncpg.Record]:
        return await self._live("fetchmany").fetchmany(query, args, timeout=timeout, record_class=record_class)

    def transaction(
        self, *, isolation: str | None = None, readonly: bool = False, deferrable: bool = False
    ) -> Transaction:
        """A transaction block, or a SAVEPOINT inside one, exactly as asyncpg's ``Connection.transaction``."""
        return Transaction(self, self._open("transaction"), isolation, readonly, deferrable)

    def is_in_transaction(self) -> bool:
        return self._live("is_in_transaction").raw.is_in_transaction()

    def is_closed(self) -> bool:
        return self._live("is_closed").raw.is_closed()

    def get_server_pid(self) -> int:
        return self._live("get_server_pid").raw.get_server_pid()

    def get_server_version(self) -> Any:
        return self._live("get_server_version").raw.get_server_version()

    def get_settings(self) -> Any:
        return self._live("get_settings").raw.get_settings()

    def get_reset_query(self) -> str:
        self._live("get_reset_query")
        return RESET_QUERY

    async def prepare(
        self, query: str, *, name: str | None = None, timeout: float | None = None, record_class: Any = None
    ) -> PreparedStatement:
        backend = self._live("prepare")
        if name is not None:
            raise self._pool._refuse(
                "asyncpg's Connection.prepare(name=...) is not supported by the lab's db: a named server-side"
                " statement outlives the request, and the lab replays every run on the same backends"
            )
        raw = backend.raw
        statement = await backend._step(
            query, (), lambda: raw.prepare(query, timeout=timeout, record_class=record_class),
            lambda _: "prepared", shown=f"prepare: {statement_text(query, ())}",
        )
        return PreparedStatement(self, backend, query, statement)

    def cursor(
        self, query: str, *args: Any, prefetch: int | None = None, timeout: float | None = None,
        record_class: Any = None,
    ) -> CursorFactory:
        backend = self._open("cursor")
        return CursorFactory(self, backend, query, args, prefetch, timeout, record_class, None)

    def _refuse(self, owner: str, method: str) -> Unsupported:
        return self._pool._refuse(refusal(owner, method))

    if not TYPE_CHECKING:  # at run time only, so that mypy still catches a misspelt method in a handler

        def __getattr__(self, name: str) -> Any:
            if not name.startswith("_") and hasattr(asyncpg.Connection, name):
                raise self._refuse("Connection", name)
            raise AttributeError(f"'Connection' object has no attribute {name!r}")


class _AcquireContext:
    """asyncpg's ``PoolAcquireContext``: ``async with db.acquire() as conn`` or ``conn = await db.acquire()``."""

    def __init__(self, pool: SessionDb, timeout: float | None) -> None:
        self.pool = pool
        self.timeout = timeout
        self.connection: Connection | None = None
        self.done = False

    async def __aenter__(self) -> Connection:
        if self.connection is not None or self.done:
            raise asyncpg.InterfaceError("a connection is already acquired")
        self.connection = await self.pool._acquire(self.timeout)
        return self.connection

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.done = True
        connection, self.connection = self.connection, None
        await self.pool.release(connection)

    def __await__(self) -> Generator[Any, None, Connection]:
        self.done = True
        return self.pool._acquire(self.timeout).__await__()


class SessionDb:
    """The pool a session sees (asyncpg's ``Pool``). Its backends persist across replays: no connects."""

    def __init__(
        self, connections: list[StepConnection], connect: Connector, scheduler: Scheduler | None, latency: float = 0.0
    ) -> None:
        self._connections = connections
        self._connect = connect
        self._scheduler = scheduler
        self._latency = latency
        self._released = asyncio.Condition()
        self.refused: Unsupported | None = None  # the first call refused, whatever the handler did with it

    def _refuse(self, message: str) -> Unsupported:
        """The exception to raise for a refused call, remembered here and by the scheduler so that a
        handler catching it cannot make the run count."""
        exc = Unsupported(message)
        self.refused = self.refused or exc
        if self._scheduler is not None:
            self._scheduler.refuse(exc)
        return exc

    def __repr__(self) -> str:
        return f"<Pool {id(self):#x}>"

    # -- acquire and release, as asyncpg's pool does them ------------------------------------------------

    def acquire(self, *, timeout: float | None = None) -> _AcquireContext:
        return _AcquireContext(self, timeout)

    async def _acquire(self, timeout: float | None) -> Connection:
        if timeout is None:
            return await self._take(None)
        return await asyncio.wait_for(self._take(timeout), timeout)

    async def _take(self, timeout: float | None) -> Connection:
        async with self._released:
            while True:
                self._connections[:] = [c for c in self._connections if c.in_use or not c.raw.is_closed()]
                free = next((c for c in self._connections if not c.in_use), None)
                if free is None and len(self._connections) < POOL_SIZE:
                    free = StepConnection(await self._connect(), self._scheduler, self._latency)
                    self._connections.append(free)
                if free is not None:
                    free.in_use = True
                    return Connection(free, self, timeout)
                await self._released.wait()  # every connection is out: wait, as asyncpg's pool does

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        if type(connection) is not Connection or connection._pool is not self:
            raise asyncpg.InterfaceError(
                f"Pool.release() received invalid connection: {connection!r} is not a member of this pool"
            )
        if timeout is None:
            timeout = connection._timeout
        backend = connection._detach()
        if backend is None:
            return  # already released: asyncpg does nothing
        try:
            await backend.reset(timeout)
        finally:
            backend.in_use = False
            async with self._released:
                self._released.notify()

    # -- the pool's own query methods: acquire, run, release ---------------------------------------------

    async def fetch(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            return await conn.fetch(query, *args, timeout=timeout, record_class=record_class)

    async def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args, timeout=timeout, record_class=record_class)

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args, column=column, timeout=timeout)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        async with self.acquire() as conn:
            return await conn.execute(query, *args, timeout=timeout)

    async def executemany(self, command: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None) -> None:
        async with self.acquire() as conn:
            await conn.executemany(command, args, timeout=timeout)

    async def fetchmany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None, record_class: Any = None
    ) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            return await conn.fetchmany(query, args, timeout=timeout, record_class=record_class)

    if not TYPE_CHECKING:  # at run time only, so that mypy still catches a misspelt method in a handler

        def __getattr__(self, name: str) -> Any:
            if not name.startswith("_") and hasattr(asyncpg.Pool, name):
                raise self._refuse(refusal("Pool", name))
            raise AttributeError(f"'Pool' object has no attribute {name!r}")


class ConnectionBank:
    """Backends kept per session name across runs; each run starts them as a fresh pool would hand them out."""

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
                # A crashed session's backend may be gone while the client has not noticed yet: ask. The
                # reset is asyncpg's at release: a connection the last run never released carries nothing over.
                if conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
                await conn.execute(RESET_QUERY)
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
