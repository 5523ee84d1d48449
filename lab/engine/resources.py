"""What a connection of the lab's db hands out: transactions, prepared statements and cursors, as asyncpg's.

Ported from asyncpg's ``transaction.py``, ``prepared_stmt.py``, ``cursor.py`` and ``connresource.py``
(Apache 2.0): the same state machines and the same errors on misuse (committing twice, a nested block
at another isolation level, a transaction in a manually begun one, a cursor outside a transaction, any
use after the connection went back to the pool). Only the route of each statement differs: it goes
through :meth:`lab.engine.proxy.StepConnection._step`, so BEGIN, SAVEPOINT, RELEASE SAVEPOINT,
ROLLBACK TO and COMMIT are each one step on the timeline, as is each batch a cursor fetches.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg.transaction import ISOLATION_LEVELS, ISOLATION_LEVELS_BY_VALUE, TransactionState

from lab.engine.trace import row_text, rows_text, statement_text, value_text

if TYPE_CHECKING:
    from lab.engine.proxy import Connection, StepConnection, Unsupported

#: What an iterated cursor fetches per round trip unless told (asyncpg's default).
PREFETCH = 50


class _Resource:
    """asyncpg's ``ConnectionResource``: usable while the acquisition that made it is neither released nor closed."""

    _asyncpg_class: type = object  # the asyncpg class this one stands for: what it has, we support or refuse

    def __init__(self, conn: Connection, backend: StepConnection) -> None:
        self._conn = conn
        self._backend = backend

    def _check_conn_validity(self, method: str) -> None:
        name = type(self).__name__
        if self._conn._backend is not self._backend:
            raise asyncpg.InterfaceError(
                f"cannot call {name}.{method}(): the underlying connection has been released back to the pool"
            )
        if self._backend.raw.is_closed():
            raise asyncpg.InterfaceError(f"cannot call {name}.{method}(): the underlying connection is closed")

    def _refuse(self, method: str) -> Unsupported:
        from lab.engine.proxy import refusal  # the pool module imports this one: import at call time

        return self._conn._pool._refuse(refusal(type(self).__name__, method))

    if not TYPE_CHECKING:  # at run time only, so that mypy still catches a misspelt method in a handler

        def __getattr__(self, name: str) -> Any:
            if not name.startswith("_") and hasattr(self._asyncpg_class, name):
                raise self._refuse(name)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class Transaction(_Resource):
    """A transaction block, or a SAVEPOINT when one is already open on the connection (asyncpg's rules)."""

    _asyncpg_class = asyncpg.transaction.Transaction

    def __init__(
        self, conn: Connection, backend: StepConnection, isolation: str | None, readonly: bool, deferrable: bool
    ) -> None:
        super().__init__(conn, backend)
        if isolation and isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation is expected to be either of {ISOLATION_LEVELS}, got {isolation!r}")
        self._isolation = isolation
        self._readonly = readonly
        self._deferrable = deferrable
        self._state = TransactionState.NEW
        self._nested = False
        self._id: str | None = None
        self._managed = False

    async def __aenter__(self) -> None:
        if self._managed:
            raise asyncpg.InterfaceError("cannot enter context: already in an `async with` block")
        self._managed = True
        await self.start()

    async def __aexit__(
        self, extype: type[BaseException] | None, ex: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._check_conn_validity("__aexit__")
        except asyncpg.InterfaceError:
            if extype is GeneratorExit:
                return  # asyncpg: the pool's release does the ROLLBACK (MagicStack/asyncpg#232)
            raise
        try:
            if extype is not None:
                await self._rollback()
            else:
                await self._commit()
        finally:
            self._managed = False

    async def start(self) -> None:
        """Enter the transaction or savepoint block."""
        self._check_conn_validity("start")
        self._check_state_base("start")
        if self._state is TransactionState.STARTED:
            raise asyncpg.InterfaceError("cannot start; the transaction is already started")
        backend = self._backend
        if backend.top_xact is None:
            if backend.raw.is_in_transaction():
                raise asyncpg.InterfaceError("cannot use Connection.transaction() in a manually started transaction")
            backend.top_xact = self
        else:
            if self._isolation:
                outer = backend.top_xact._isolation
                if outer is None:
                    outer = ISOLATION_LEVELS_BY_VALUE[await backend.fetchval("SHOW transaction_isolation;")]
                if self._isolation != outer:
                    raise asyncpg.InterfaceError(
                        f"nested transaction has a different isolation level: current {self._isolation!r}"
                        f" != outer {outer!r}"
                    )
            self._nested = True
        if self._nested:
            self._id = backend.unique_id("savepoint")
            query = f"SAVEPOINT {self._id};"
        else:
            query = "BEGIN"
            if self._isolation:
                query += " ISOLATION LEVEL " + self._isolation.replace("_", " ").upper()
            if self._readonly:
                query += " READ ONLY"
            if self._deferrable:
                query += " DEFERRABLE"
            query += ";"
        await self._run(query, TransactionState.STARTED)

    async def commit(self) -> None:
        """Exit the transaction or savepoint block and commit changes."""
        self._check_conn_validity("commit")
        if self._managed:
            raise asyncpg.InterfaceError("cannot manually commit from within an `async with` block")
        await self._commit()

    async def rollback(self) -> None:
        """Exit the transaction or savepoint block and roll back changes."""
        self._check_conn_validity("rollback")
        if self._managed:
            raise asyncpg.InterfaceError("cannot manually rollback from within an `async with` block")
        await self._rollback()

    async def _commit(self) -> None:
        self._check_state("commit")
        if self._backend.top_xact is self:
            self._backend.top_xact = None
        await self._run(f"RELEASE SAVEPOINT {self._id};" if self._nested else "COMMIT;", TransactionState.COMMITTED)

    async def _rollback(self) -> None:
        self._check_state("rollback")
        if self._backend.top_xact is self:
            self._backend.top_xact = None
        await self._run(f"ROLLBACK TO {self._id};" if self._nested else "ROLLBACK;", TransactionState.ROLLEDBACK)

    async def _run(self, query: str, then: TransactionState) -> None:
        try:
            await self._backend.execute(query)
        except BaseException:
            self._state = TransactionState.FAILED
            raise
        self._state = then

    def _check_state_base(self, opname: str) -> None:
        if self._state is TransactionState.COMMITTED:
            raise asyncpg.InterfaceError(f"cannot {opname}; the transaction is already committed")
        if self._state is TransactionState.ROLLEDBACK:
            raise asyncpg.InterfaceError(f"cannot {opname}; the transaction is already rolled back")
        if self._state is TransactionState.FAILED:
            raise asyncpg.InterfaceError(f"cannot {opname}; the transaction is in error state")

    def _check_state(self, opname: str) -> None:
        if self._state is not TransactionState.STARTED:
            if self._state is TransactionState.NEW:
                raise asyncpg.InterfaceError(f"cannot {opname}; the transaction is not yet started")
            self._check_state_base(opname)


class PreparedStatement(_Resource):
    """A statement prepared on the backend; each execution of it is one step."""

    _asyncpg_class = asyncpg.prepared_stmt.PreparedStatement

    def __init__(self, conn: Connection, backend: StepConnection, query: str, statement: Any) -> None:
        super().__init__(conn, backend)
        self._query = query
        self._statement = statement  # asyncpg's own PreparedStatement, on the backend's raw connection

    def get_name(self) -> str:
        self._check_conn_validity("get_name")
        name: str = self._statement.get_name()
        return name

    def get_query(self) -> str:
        self._check_conn_validity("get_query")
        return self._query

    def get_statusmsg(self) -> str:
        self._check_conn_validity("get_statusmsg")
        status: str = self._statement.get_statusmsg()
        return status

    def get_parameters(self) -> Any:
        self._check_conn_validity("get_parameters")
        return self._statement.get_parameters()

    def get_attributes(self) -> Any:
        self._check_conn_validity("get_attributes")
        return self._statement.get_attributes()

    def cursor(self, *args: Any, prefetch: int | None = None, timeout: float | None = None) -> CursorFactory:
        self._check_conn_validity("cursor")
        return CursorFactory(self._conn, self._backend, self._query, args, prefetch, timeout, None, self._statement)

    async def fetch(self, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:
        self._check_conn_validity("fetch")
        statement = self._statement
        rows: list[asyncpg.Record] = await self._backend._step(
            self._query, args, lambda: statement.fetch(*args, timeout=timeout), rows_text
        )
        return rows

    async def fetchval(self, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        self._check_conn_validity("fetchval")
        statement = self._statement
        return await self._backend._step(
            self._query, args, lambda: statement.fetchval(*args, column=column, timeout=timeout), value_text
        )

    async def fetchrow(self, *args: Any, timeout: float | None = None) -> asyncpg.Record | None:
        self._check_conn_validity("fetchrow")
        statement = self._statement
        row: asyncpg.Record | None = await self._backend._step(
            self._query, args, lambda: statement.fetchrow(*args, timeout=timeout), row_text
        )
        return row

    async def fetchmany(self, args: Iterable[Sequence[Any]], *, timeout: float | None = None) -> list[asyncpg.Record]:
        self._check_conn_validity("fetchmany")
        statement, sets = self._statement, list(args)
        rows: list[asyncpg.Record] = await self._backend._step(
            self._query, sets, lambda: statement.fetchmany(sets, timeout=timeout), rows_text,
            shown=f"{statement_text(self._query, ())}  -- fetchmany, {len(sets)} parameter sets",
        )
        return rows

    async def executemany(self, args: Iterable[Sequence[Any]], *, timeout: float | None = None) -> None:
        self._check_conn_validity("executemany")
        statement, sets = self._statement, list(args)
        await self._backend._step(
            self._query, sets, lambda: statement.executemany(sets, timeout=timeout), lambda _: "done",
            shown=f"{statement_text(self._query, ())}  -- executemany, {len(sets)} parameter sets",
        )


class CursorFactory(_Resource):
    """``conn.cursor(...)``: iterate it (``async for``) or await it for a :class:`Cursor`."""

    _asyncpg_class = asyncpg.cursor.CursorFactory

    def __init__(
        self, conn: Connection, backend: StepConnection, query: str, args: Sequence[Any], prefetch: int | None,
        timeout: float | None, record_class: Any, statement: Any,
    ) -> None:
        super().__init__(conn, backend)
        self._query, self._args, self._prefetch = query, args, prefetch
        self._timeout, self._record_class, self._statement = timeout, record_class, statement

    def __aiter__(self) -> CursorIterator:
        self._check_conn_validity("__aiter__")
        prefetch = PREFETCH if self._prefetch is None else self._prefetch
        return CursorIterator(self, prefetch)

    def __await__(self) -> Generator[Any, None, Cursor]:
        self._check_conn_validity("__await__")
        if self._prefetch is not None:
            raise asyncpg.InterfaceError("prefetch argument can only be specified for iterable cursor")
        return self._open().__await__()

    async def _open(self, first: int = 0) -> Cursor:
        """A portal on the backend (asyncpg's own cursor), opened in one step with its ``first`` rows fetched."""
        if self._statement is not None:
            raw = self._statement.cursor(*self._args, timeout=self._timeout)
        else:
            raw = self._backend.raw.cursor(
                self._query, *self._args, timeout=self._timeout, record_class=self._record_class
            )
        timeout = self._timeout

        async def open_portal() -> tuple[Any, list[asyncpg.Record]]:
            opened = await raw
            return opened, (await opened.fetch(first, timeout=timeout) if first else [])

        opened, rows = await self._backend._step(
            self._query, self._args, open_portal, lambda got: rows_text(got[1]) if first else "cursor open",
            shown=f"cursor: {statement_text(self._query, self._args)}",
        )
        cursor = Cursor(self, opened)
        cursor._first, cursor._exhausted = rows, bool(first) and len(rows) < first
        return cursor


class Cursor(_Resource):
    """An open portal: :meth:`fetch`, :meth:`fetchrow` and :meth:`forward` are one step each."""

    _asyncpg_class = asyncpg.cursor.Cursor

    def __init__(self, factory: CursorFactory, cursor: Any) -> None:
        super().__init__(factory._conn, factory._backend)
        self._query = factory._query
        self._cursor = cursor  # asyncpg's own Cursor, on the backend's raw connection
        self._exhausted = False  # asyncpg's rule: a short batch means the portal has no more rows
        self._first: list[asyncpg.Record] = []  # what an iterator's opening step fetched

    def _check_ready(self) -> None:
        if not self._backend.raw.is_in_transaction():
            raise asyncpg.NoActiveSQLTransactionError("cursor cannot be created outside of a transaction")

    def _shown(self, what: str) -> str:
        return f"{what} (cursor: {statement_text(self._query, ())})"

    async def fetch(self, n: int, *, timeout: float | None = None) -> list[asyncpg.Record]:
        """The next ``n`` rows."""
        self._check_conn_validity("fetch")
        self._check_ready()
        if n <= 0:
            raise asyncpg.InterfaceError("n must be greater than zero")
        if self._exhausted:
            return []
        cursor = self._cursor
        rows: list[asyncpg.Record] = await self._backend._step(
            self._query, (), lambda: cursor.fetch(n, timeout=timeout), rows_text, shown=self._shown(f"FETCH {n}")
        )
        if len(rows) < n:
            self._exhausted = True
        return rows

    async def fetchrow(self, *, timeout: float | None = None) -> asyncpg.Record | None:
        """The next row, or None."""
        self._check_conn_validity("fetchrow")
        self._check_ready()
        if self._exhausted:
            return None
        cursor = self._cursor
        row: asyncpg.Record | None = await self._backend._step(
            self._query, (), lambda: cursor.fetchrow(timeout=timeout), row_text, shown=self._shown("FETCH 1")
        )
        if row is None:
            self._exhausted = True
        return row

    async def forward(self, n: int, *, timeout: float | None = None) -> int:
        """Skip the next ``n`` rows; how many were skipped."""
        self._check_conn_validity("forward")
        self._check_ready()
        if n <= 0:
            raise asyncpg.InterfaceError("n must be greater than zero")
        cursor = self._cursor
        moved: int = await self._backend._step(
            self._query, (), lambda: cursor.forward(n, timeout=timeout), str, shown=self._shown(f"MOVE FORWARD {n}")
        )
        if moved < n:
            self._exhausted = True
        return moved


class CursorIterator(_Resource):
    """``async for row in conn.cursor(...)``: rows fetched ``prefetch`` at a time, one step per batch."""

    _asyncpg_class = asyncpg.cursor.CursorIterator

    def __init__(self, factory: CursorFactory, prefetch: int) -> None:
        super().__init__(factory._conn, factory._backend)
        if prefetch <= 0:
            raise asyncpg.InterfaceError("prefetch argument must be greater than zero")
        self._factory = factory
        self._prefetch = prefetch
        self._cursor: Cursor | None = None
        self._buffer: list[asyncpg.Record] = []

    def __aiter__(self) -> CursorIterator:
        self._check_conn_validity("__aiter__")
        return self

    async def __anext__(self) -> asyncpg.Record:
        self._check_conn_validity("__anext__")
        if self._cursor is None:
            self._cursor = await self._factory._open(first=self._prefetch)
            self._buffer = self._cursor._first
        elif not self._buffer and not self._cursor._exhausted:
            self._buffer = await self._cursor.fetch(self._prefetch, timeout=self._factory._timeout)
        if self._buffer:
            return self._buffer.pop(0)
        raise StopAsyncIteration

