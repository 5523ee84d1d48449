"""Programs of asyncpg calls, run against anything with asyncpg ``Pool``'s API, and what they observed.

A program is data (frozen dataclasses), so hypothesis can generate and shrink one and a failure prints
it readably. :func:`play` runs it against a pool and returns its log: every call's result, or the
exception it raised (type, SQLSTATE, message), in order. The differential test plays one program
against a real asyncpg pool and against the lab's db and compares the logs and the database after.

The generated programs never wait on themselves: a statement that takes a lock another connection of
the same program might hold runs only on the one connection that can hold locks at that moment (the
pool itself at depth 0, the first acquired connection at depth 1); everything else only reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import asyncpg
from hypothesis import strategies as st

SCHEMA = "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL CHECK (v >= 0));"
SEED = "INSERT INTO kv VALUES (1, 1), (2, 2);"

# name: (sql, how many parameters). Reads never wait on a lock; writes may, so they run only where no
# other connection of the program can hold one.
READS = {
    "all": ("SELECT k, v FROM kv ORDER BY k", 0),
    "one": ("SELECT v FROM kv WHERE k = $1", 1),
    "divide": ("SELECT 10 / $1::int AS q", 1),  # 0: DivisionByZeroError, 22012
    "series": ("SELECT g FROM generate_series(1, $1::int) AS g", 1),
    "try_lock": ("SELECT pg_try_advisory_lock($1)", 1),
    "my_locks": ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()", 0),
    "isolation": ("SHOW transaction_isolation", 0),
    "read_only": ("SHOW transaction_read_only", 0),
    "setting": ("SHOW statement_timeout", 0),
    "set": ("SET statement_timeout = '7s'", 0),  # a session setting: the pool's reset takes it back
}
WRITES = {
    "insert": ("INSERT INTO kv (k, v) VALUES ($1, $2)", 2),  # UniqueViolationError, 23505
    "upsert": ("INSERT INTO kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING RETURNING k", 2),
    "take": ("UPDATE kv SET v = v - $2 WHERE k = $1 RETURNING v", 2),  # CheckViolationError, 23514
    "delete": ("DELETE FROM kv WHERE k = $1", 1),
    "lock": ("SELECT pg_advisory_lock($1)", 1),  # session-level: held until unlocked or the pool's reset
    "xact_lock": ("SELECT pg_advisory_xact_lock($1)", 1),
    "begin": ("BEGIN", 0),
    "commit": ("COMMIT", 0),
    "rollback": ("ROLLBACK", 0),
    "script": ("INSERT INTO kv VALUES (9, 0) ON CONFLICT DO NOTHING; UPDATE kv SET v = v + 1 WHERE k = 9", 0),
}
SQL = {**READS, **WRITES}


@dataclass(frozen=True)
class Query:
    """``target.method(sql, *args)`` on the pool or on the innermost acquired connection."""

    on: str  # "pool" | "conn"
    method: str  # fetch | fetchrow | fetchval | execute | executemany | fetchmany
    sql: str
    args: tuple[Any, ...] = ()  # for executemany and fetchmany: a tuple of parameter tuples
    timeout: float | None = None
    column: int = 0
    escapes: bool = False  # its error is not caught here: it leaves the enclosing block, as in a handler


@dataclass(frozen=True)
class Acquire:
    """``async with pool.acquire() as conn`` ("with") or ``conn = await pool.acquire()`` ... ``release``."""

    style: str
    body: tuple[Op, ...]


@dataclass(frozen=True)
class Block:
    """A ``conn.transaction(...)``: with ``async with`` or ``start()``, ended as ``end`` says.

    with: "ok" (falls off the end), "raise" (a Python exception leaves it), "fail" (a statement's error
    leaves it), "manual" (calls commit() inside, which asyncpg refuses). manual: "commit", "rollback",
    "none" (left open), "commit_twice", "rollback_commit", "start_twice".
    """

    style: str
    end: str
    body: tuple[Op, ...]
    isolation: str | None = None
    readonly: bool = False
    deferrable: bool = False


@dataclass(frozen=True)
class InTransaction:
    """``conn.is_in_transaction()``."""


@dataclass(frozen=True)
class Prepared:
    """``stmt = await conn.prepare(sql)``, then each ``(method, args)`` on it."""

    sql: str
    calls: tuple[tuple[str, tuple[Any, ...]], ...]


@dataclass(frozen=True)
class CursorOf:
    """``conn.cursor(sql, *args)`` iterated ("iterate", with ``prefetch``) or awaited and then ``calls``."""

    sql: str
    args: tuple[Any, ...]
    style: str
    prefetch: int | None = None
    calls: tuple[tuple[str, int], ...] = ()  # ("fetch", n) | ("fetchrow", 0) | ("forward", n)


Op = Query | Acquire | Block | InTransaction | Prepared | CursorOf


class Abort(Exception):
    """The Python exception a ``raise`` block ends with."""


# -- playing a program ---------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A result as comparable data: records become tuples of (column, value), objects their class name."""
    if isinstance(value, asyncpg.Record):
        return ("record", tuple(value.items()))
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return ("object", type(value).__name__)  # a prepared statement or a cursor: the same class name in both


def described(exc: BaseException) -> tuple[str, str | None, str]:
    """An exception as its class, SQLSTATE and message, without what differs run to run (ids, addresses)."""
    message = re.sub(r"__asyncpg_[a-z]+_[0-9a-f]+__", "<id>", str(exc))
    message = re.sub(r"<[^<>]* 0x[0-9a-f]+>", "<object>", message)
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}", getattr(exc, "sqlstate", None), message


class Player:
    """Plays ops against one pool and writes down what each call gave."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.log: list[Any] = []

    async def attempt(self, label: str, call: Any, *, escapes: bool = False) -> Any:
        try:
            value = await call
        except Exception as exc:
            self.log.append((label, "raised", described(exc)))
            if escapes:
                raise
            return None
        self.log.append((label, plain(value)))
        return value

    async def play(self, ops: tuple[Op, ...], conns: tuple[Any, ...] = ()) -> None:
        for op in ops:
            await self.one(op, conns)

    async def one(self, op: Op, conns: tuple[Any, ...]) -> None:
        if isinstance(op, Query):
            await self.query(op, conns)
        elif isinstance(op, Acquire):
            await self.acquire(op, conns)
        elif isinstance(op, Block):
            await self.block(op, conns)
        elif isinstance(op, InTransaction):
            self.log.append(("is_in_transaction", conns[-1].is_in_transaction()))
        elif isinstance(op, Prepared):
            await self.prepared(op, conns[-1])
        else:
            await self.cursor(op, conns[-1])

    async def query(self, op: Query, conns: tuple[Any, ...]) -> None:
        target = self.pool if op.on == "pool" else conns[-1]
        sql = SQL[op.sql][0]
        label = f"{op.on}.{op.method} {op.sql}"
        if op.method == "fetchval":
            call = target.fetchval(sql, *op.args, column=op.column, timeout=op.timeout)
        elif op.method in ("executemany", "fetchmany"):
            call = getattr(target, op.method)(sql, list(op.args), timeout=op.timeout)
        else:
            call = getattr(target, op.method)(sql, *op.args, timeout=op.timeout)
        await self.attempt(label, call, escapes=op.escapes)

    async def acquire(self, op: Acquire, conns: tuple[Any, ...]) -> None:
        try:
            if op.style == "with":
                async with self.pool.acquire() as conn:
                    await self.play(op.body, (*conns, conn))
            else:
                conn = await self.pool.acquire()
                try:
                    await self.play(op.body, (*conns, conn))
                finally:
                    await self.pool.release(conn)
            self.log.append(("released",))
        except Exception as exc:
            self.log.append(("acquire", "raised", described(exc)))

    async def block(self, op: Block, conns: tuple[Any, ...]) -> None:
        conn = conns[-1]
        try:
            tr = conn.transaction(isolation=op.isolation, readonly=op.readonly, deferrable=op.deferrable)
        except Exception as exc:
            self.log.append(("transaction()", "raised", described(exc)))
            return
        if op.style == "with":
            try:
                async with tr:
                    await self.play(op.body, conns)
                    if op.end == "raise":
                        raise Abort
                    if op.end == "fail":
                        await conn.execute("SELECT 1 / 0")
                    if op.end == "manual":
                        await self.attempt("commit inside with", tr.commit())
                self.log.append(("block", "committed"))
            except Abort:
                self.log.append(("block", "aborted"))
            except Exception as exc:
                self.log.append(("block", "raised", described(exc)))
            return
        await self.attempt("start", tr.start())
        await self.play(op.body, conns)
        ends = {
            "commit": ("commit",), "rollback": ("rollback",), "none": (), "commit_twice": ("commit", "commit"),
            "rollback_commit": ("rollback", "commit"), "start_twice": ("start", "commit"),
        }  # fmt: skip
        for method in ends[op.end]:
            await self.attempt(method, getattr(tr, method)())

    async def prepared(self, op: Prepared, conn: Any) -> None:
        stmt = await self.attempt(f"prepare {op.sql}", conn.prepare(SQL[op.sql][0]))
        if stmt is None:
            return
        self.log.append(("get_query", stmt.get_query() == SQL[op.sql][0]))
        for method, args in op.calls:
            if method in ("executemany", "fetchmany"):
                call = getattr(stmt, method)(list(args))
            else:
                call = getattr(stmt, method)(*args)
            await self.attempt(f"stmt.{method}", call)

    async def cursor(self, op: CursorOf, conn: Any) -> None:
        sql = SQL[op.sql][0]
        if op.style == "iterate":
            rows = []
            try:
                async for row in conn.cursor(sql, *op.args, prefetch=op.prefetch):
                    rows.append(plain(row))
                self.log.append(("iterated", rows))
            except Exception as exc:
                self.log.append(("iterated", rows, "raised", described(exc)))
            return
        cursor = await self.attempt("cursor", _awaited(conn.cursor(sql, *op.args, prefetch=op.prefetch)))
        if cursor is None:
            return
        for method, n in op.calls:
            await self.attempt(f"cursor.{method}", cursor.fetchrow() if method == "fetchrow" else
                               getattr(cursor, method)(n))


async def _awaited(factory: Any) -> Any:
    return await factory


async def play(pool: Any, ops: tuple[Op, ...]) -> list[Any]:
    player = Player(pool)
    try:
        await player.play(ops)
    except Exception as exc:  # a statement's error that escaped every block
        player.log.append(("escaped", described(exc)))
    return player.log


# -- generating programs -------------------------------------------------------------------------------

KEYS = st.integers(1, 3)
AMOUNTS = st.integers(0, 3)


def _args(arity: int) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(*[KEYS if i == 0 else AMOUNTS for i in range(arity)])


@st.composite
def queries(draw: st.DrawFn, on: str, writes: bool) -> Query:
    names = sorted(SQL if writes else READS)
    name = draw(st.sampled_from(names))
    arity = SQL[name][1]
    if arity and draw(st.integers(0, 3)) == 0:
        method = draw(st.sampled_from(["executemany", "fetchmany"]))
        sets = draw(st.lists(_args(arity), max_size=3))
        return Query(on, method, name, tuple(sets), draw(st.sampled_from([None, 5.0])))
    method = draw(st.sampled_from(["fetch", "fetchrow", "fetchval", "execute"]))
    column = draw(st.integers(0, 1)) if method == "fetchval" else 0
    escapes = draw(st.integers(0, 3)) == 0
    return Query(on, method, name, draw(_args(arity)), draw(st.sampled_from([None, 5.0])), column, escapes)


@cache  # one strategy object per level, so the deferred recursion ends
def programs(depth: int = 0, max_size: int = 6) -> st.SearchStrategy[tuple[Op, ...]]:
    """Ops at ``depth`` acquired connections; statements that may wait on a lock only where none can be held."""
    options: list[st.SearchStrategy[Op]] = [queries("pool", writes=depth == 0)]
    if depth < 2:
        options.append(st.builds(Acquire, st.sampled_from(["with", "await"]),
                                 st.deferred(lambda: programs(depth + 1, max_size=4))))
    if depth >= 1:
        writes = depth == 1
        options += [
            queries("conn", writes=writes),
            st.just(InTransaction()),
            blocks(depth, writes),
            prepared(writes),
            cursors(),
        ]
    return st.lists(st.one_of(options), max_size=max_size).map(tuple)


@cache
def blocks(depth: int, writes: bool) -> st.SearchStrategy[Op]:
    """Transactions (and, inside one, savepoints) with every way of starting and ending them."""
    inner = st.deferred(lambda: st.lists(
        st.one_of(queries("conn", writes), queries("pool", writes=False), st.just(InTransaction()),
                  blocks(depth, writes), cursors()),
        max_size=4,
    ).map(tuple))
    levels = st.sampled_from([None, None, "read_committed", "repeatable_read", "serializable", "snapshot"])
    # DEFERRABLE waits for a safe snapshot: only where no other connection of the program holds a transaction
    with_ends = st.builds(Block, st.just("with"), st.sampled_from(["ok", "raise", "fail", "manual"]), inner,
                          levels, st.booleans(), st.booleans() if depth == 1 else st.just(False))
    manual_ends = st.builds(Block, st.just("manual"),
                            st.sampled_from(["commit", "rollback", "none", "commit_twice", "rollback_commit",
                                             "start_twice"]),
                            inner, st.sampled_from([None, None, "read_committed", "serializable"]),
                            st.booleans(), st.just(False))
    return st.one_of(with_ends, manual_ends)


def prepared(writes: bool) -> st.SearchStrategy[Op]:
    names = sorted(n for n, (_, arity) in (SQL if writes else READS).items() if arity >= 1)

    @st.composite
    def build(draw: st.DrawFn) -> Prepared:
        name = draw(st.sampled_from(names))
        arity = SQL[name][1]
        call = st.one_of(
            st.tuples(st.sampled_from(["fetch", "fetchrow", "fetchval"]), _args(arity)),
            st.tuples(st.sampled_from(["executemany", "fetchmany"]), st.lists(_args(arity), max_size=3).map(tuple)),
        )
        return Prepared(name, tuple(draw(st.lists(call, max_size=3))))

    return build()


def cursors() -> st.SearchStrategy[Op]:
    iterate = st.builds(CursorOf, st.just("series"), st.tuples(st.integers(0, 7)), st.just("iterate"),
                        st.sampled_from([None, 1, 2, 3]))
    calls = st.lists(st.tuples(st.sampled_from(["fetch", "fetchrow", "forward"]), st.integers(0, 3)), max_size=4)
    awaited = st.builds(CursorOf, st.just("series"), st.tuples(st.integers(0, 7)), st.just("await"),
                        st.just(None), calls.map(tuple))
    return st.one_of(iterate, awaited)
