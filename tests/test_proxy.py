"""The db a handler gets is asyncpg's: the same calls on a real asyncpg pool and on the lab's db agree.

A differential test: each program of calls (``tests/asyncpg_programs.py``) is played three times, on
a pool from ``asyncpg.create_pool``, on the lab's db under the scheduler (one session, every statement
a step) and on the lab's db unscheduled (as stress mode uses it), and the three must give the same log
(every result; every exception's class, SQLSTATE and message) and leave the same database behind (the
table, and the advisory locks the program's backends still hold). Hypothesis writes programs; the
named cases below pin every method and every way of nesting, committing and rolling back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from asyncpg_programs import (
    SCHEMA,
    SEED,
    Acquire,
    Block,
    CursorOf,
    InTransaction,
    Op,
    Prepared,
    Query,
    described,
    plain,
    play,
    programs,
)
from hypothesis import HealthCheck, given, settings

from lab.engine.proxy import ConnectionBank, SessionDb, Unsupported
from lab.engine.scheduler import Scheduler
from lab.engine.schedules import ScriptedChooser
from lab.postgres.provision import Postgres
from lab.postgres.workspace import Workspace
from lab.registry import scenario
from lab.workshop.commands import grade
from lab.workshop.grading import CannotGrade
from lab.workshop.submission import load

RAW, LAB = "proxy-test-asyncpg", "proxy-test-lab"
#: Generated programs per run: about 3 s under `make test`; LAB_PROXY_EXAMPLES=2000 for a longer hunt.
EXAMPLES = int(os.environ.get("LAB_PROXY_EXAMPLES", "50"))
Program = Callable[[Any], Awaitable[list[Any]]]


class Targets:
    """A real asyncpg pool and the lab's db over the same schema, each with its own application_name."""

    def __init__(self, workspace: Workspace, pool: asyncpg.Pool, bank: ConnectionBank, monitor: asyncpg.Connection):
        self.workspace, self.pool, self.bank, self.monitor = workspace, pool, bank, monitor
        self.trace_rows: list[str] = []

    async def observe(self, program: Program, how: str) -> tuple[list[Any], list[Any]]:
        """The program's log and the database after it, from fresh rows."""
        await self.workspace.reset()
        if how == "asyncpg":
            log = await program(self.pool)
        elif how == "scheduled":
            scheduler = Scheduler(self.monitor, step_timeout=10)
            db = await self.bank.db_for("T1", scheduler)

            async def session() -> list[Any]:
                return await program(db)

            [result] = await scheduler.run({"T1": session}, ScriptedChooser([], strict=False))
            assert result.error is None, result.error
            log = result.result
            self.trace_rows = [row.text for row in scheduler.trace.rows]
        else:
            log = await program(await self.bank.db_for("S1", None))
        return log, await self.state(RAW if how == "asyncpg" else LAB)

    async def state(self, application: str) -> list[Any]:
        admin, schema = self.workspace.admin, self.workspace.schema
        rows = await admin.fetch(f"SELECT k, v FROM {schema}.kv ORDER BY k")
        locks = await admin.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND a.application_name = $1", application,
        )
        return [plain(rows), locks]

    async def agree(self, program: Program) -> tuple[list[Any], list[Any]]:
        """asyncpg's log and state, after asserting the lab's db gives the same, scheduled and not."""
        expected = await self.observe(program, "asyncpg")
        assert await self.observe(program, "scheduled") == expected
        assert await self.observe(program, "unscheduled") == expected
        return expected


@asynccontextmanager
async def opened(workspace: Workspace, **settings: str) -> AsyncIterator[Targets]:
    """Both pools over the workspace's schema; ``settings`` go to every backend, as issue 15's --isolation does."""

    def settings_for(application: str) -> dict[str, str]:
        return {"search_path": workspace.schema, "application_name": application, **settings}

    pool = await asyncpg.create_pool(workspace.dsn, min_size=1, max_size=10, server_settings=settings_for(RAW))

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(workspace.dsn, server_settings=settings_for(LAB))

    bank = ConnectionBank(connect)
    monitor = await workspace.connect()
    try:
        yield Targets(workspace, pool, bank, monitor)
    finally:
        pool.terminate()
        await bank.close()
        await monitor.close()


@pytest.fixture(scope="module")
async def targets(workspace: Workspace) -> AsyncIterator[Targets]:
    await workspace.install(SCHEMA, SEED)
    async with opened(workspace) as both:
        yield both


def calls(*ops: Op) -> Program:
    async def program(pool: Any) -> list[Any]:
        return await play(pool, ops)

    return program


# -- generated programs ------------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=programs())
async def test_any_program_of_calls_gives_what_asyncpg_gives(targets: Targets, ops: tuple[Op, ...]) -> None:
    """Generated programs (queries, nested acquires, transactions and savepoints, prepared statements, cursors)."""
    await targets.agree(calls(*ops))


# -- every method, every nesting, named ---------------------------------------------------------------------

K5 = (5, 1)
CASES: dict[str, tuple[Op, ...]] = {
    "pool query methods, no rows, column=, status strings": (
        Query("pool", "fetch", "all"), Query("pool", "fetchrow", "one", (3,)), Query("pool", "fetchrow", "one", (2,)),
        Query("pool", "fetchval", "one", (3,)), Query("pool", "fetchval", "all", column=1),
        Query("pool", "execute", "insert", K5), Query("pool", "execute", "script"), Query("pool", "execute", "set"),
        Query("pool", "execute", "delete", (4,)),
    ),
    "timeout= on every query method": (
        Query("pool", "fetch", "all", timeout=5), Query("pool", "fetchrow", "one", (1,), timeout=5),
        Query("pool", "fetchval", "one", (1,), timeout=5), Query("pool", "execute", "upsert", K5, timeout=5),
        Query("pool", "executemany", "delete", ((5,),), timeout=5),
        Query("pool", "fetchmany", "one", ((1,), (2,)), timeout=5),
    ),
    "executemany is atomic, fetchmany returns every row": (
        Query("pool", "executemany", "insert", ((5, 1), (1, 1))), Query("pool", "executemany", "insert", ((6, 1),)),
        Query("pool", "fetchmany", "upsert", ((7, 1), (1, 1), (8, 2))),
    ),
    "errors keep their class and SQLSTATE": (
        Query("pool", "execute", "insert", (1, 1)), Query("pool", "fetchval", "take", (1, 3)),
        Query("pool", "fetchval", "divide", (0,)), Query("pool", "fetchval", "all", column=2),
    ),
    "acquire as async with, as await and release, nested": (
        Acquire("with", (Query("conn", "fetch", "all"), Acquire("await", (Query("conn", "fetchval", "one", (1,)),)))),
        Acquire("await", (Query("conn", "execute", "insert", K5),)),
    ),
    "transaction commits, or rolls back on an exception": (
        Acquire("with", (
            Block("with", "ok", (Query("conn", "execute", "insert", K5), InTransaction())),
            Block("with", "raise", (Query("conn", "execute", "insert", (6, 1)),)),
            Block("with", "fail", (Query("conn", "execute", "insert", (7, 1)),)),
            InTransaction(),
        )),
    ),
    "isolation, readonly, deferrable": (
        Acquire("with", (
            Block("with", "ok", (Query("conn", "fetchval", "isolation"), Query("conn", "fetchval", "read_only")),
                  "serializable", True, True),
            Block("with", "ok", (Query("conn", "execute", "insert", K5),), "repeatable_read", True),
            Block("with", "ok", (Query("conn", "fetchval", "isolation"),), "read_uncommitted"),
            Block("with", "ok", (), "snapshot"),
        )),
    ),
    "start, commit, rollback, and their misuse": (
        Acquire("with", (
            Block("manual", "commit", (Query("conn", "execute", "insert", K5),)),
            Block("manual", "rollback", (Query("conn", "execute", "insert", (6, 1)),)),
            Block("manual", "commit_twice", ()), Block("manual", "rollback_commit", ()),
            Block("manual", "start_twice", (Query("conn", "execute", "insert", (7, 1)),)),
            Block("with", "manual", ()),
        )),
    ),
    "a nested block is a savepoint: its rollback keeps the outer work": (
        Acquire("with", (
            Block("with", "ok", (
                Query("conn", "execute", "insert", K5),
                Block("with", "raise", (Query("conn", "execute", "insert", (6, 1)),)),
                Block("with", "ok", (Query("conn", "execute", "insert", (7, 1)), InTransaction())),
                Block("manual", "rollback", (Query("conn", "execute", "insert", (8, 1)),)),
                Block("manual", "commit", (Query("conn", "execute", "insert", (9, 1)),)),
            )),
        )),
    ),
    "a unique violation inside a savepoint leaves the outer transaction usable": (
        Acquire("with", (
            Block("with", "ok", (
                Block("with", "ok", (Query("conn", "execute", "insert", (1, 1), escapes=True),)),
                Query("conn", "execute", "insert", K5),
            )),
            Block("with", "ok", (
                Query("conn", "execute", "insert", (1, 1)),  # no savepoint: the whole transaction is aborted
                Query("conn", "execute", "insert", (6, 1)),
            )),
        )),
    ),
    "a nested block's isolation must match the outer one": (
        Acquire("with", (
            Block("with", "ok", (Block("with", "ok", (), "serializable"),)),
            Block("with", "ok", (Block("with", "ok", (), "read_committed"),)),
            Block("with", "ok", (Block("with", "ok", (), "serializable"),), "serializable"),
            Block("with", "ok", (Block("with", "ok", (), "repeatable_read"),), "serializable"),
        )),
    ),
    "no transaction() in a manually begun one; a block left open is rolled back at release": (
        Acquire("with", (
            Query("conn", "execute", "begin"), Block("with", "ok", ()), InTransaction(),
            Query("conn", "execute", "rollback"),
        )),
        Acquire("with", (Block("manual", "none", (Query("conn", "execute", "insert", K5),)), InTransaction())),
        Acquire("await", (Query("conn", "execute", "begin"), Query("conn", "execute", "insert", (6, 1)))),
        Query("pool", "execute", "begin"), Query("pool", "fetchval", "my_locks"),
    ),
    "release resets the session: advisory locks, settings": (
        Acquire("with", (
            Query("conn", "fetchval", "lock", (1,)), Query("pool", "fetchval", "try_lock", (1,)),
            Query("conn", "execute", "set"), Query("conn", "fetchval", "setting"),
        )),
        Query("pool", "fetchval", "try_lock", (1,)), Query("pool", "fetchval", "setting"),
        Query("pool", "fetchval", "lock", (2,)), Query("pool", "fetchval", "my_locks"),
        Acquire("with", (Query("conn", "fetchval", "my_locks"), Query("conn", "fetchval", "setting"))),
    ),
    "the pool reads committed rows while another connection's transaction is open": (
        Acquire("with", (
            Block("with", "ok", (
                Query("conn", "execute", "insert", K5), Query("pool", "fetch", "all"), Query("conn", "fetch", "all"),
            )),
            Query("pool", "fetch", "all"),
        )),
    ),
    "prepare, and the prepared statement's methods": (
        Acquire("with", (
            Prepared("one", (("fetch", (1,)), ("fetchrow", (3,)), ("fetchval", (2,)), ("fetchmany", ((1,), (2,))))),
            Prepared("insert", (("executemany", (K5, (6, 1))), ("fetch", (1, 1)))),
            Prepared("upsert", (("fetchmany", ((7, 1), (1, 1))), ("fetchrow", (8, 2)))),
        )),
    ),
    "cursors: iterated, awaited, and outside a transaction": (
        Acquire("with", (
            CursorOf("series", (5,), "iterate"),
            CursorOf("series", (5,), "await", None, (("fetch", 2),)),
            Block("with", "ok", (
                CursorOf("series", (5,), "iterate", 2), CursorOf("series", (4,), "iterate", 2),
                CursorOf("series", (0,), "iterate"), CursorOf("series", (3,), "iterate", 0),
                CursorOf("series", (3,), "await", 2),
                CursorOf("series", (7,), "await", None, (
                    ("fetch", 2), ("fetchrow", 0), ("forward", 2), ("fetch", 0), ("forward", 0), ("fetch", 5),
                    ("fetchrow", 0), ("fetch", 1), ("forward", 1),
                )),
            )),
        )),
    ),
}


@pytest.mark.parametrize("name", CASES)
async def test_each_method_and_nesting_gives_what_asyncpg_gives(targets: Targets, name: str) -> None:
    """Each named program gives asyncpg's log and leaves asyncpg's database."""
    await targets.agree(calls(*CASES[name]))


AT_SERIALIZABLE = [
    "transaction commits, or rolls back on an exception", "isolation, readonly, deferrable",
    "a nested block's isolation must match the outer one", "release resets the session: advisory locks, settings",
]


@pytest.mark.parametrize("name", AT_SERIALIZABLE)
async def test_sessions_at_another_default_isolation_give_what_asyncpg_gives(
    targets: Targets, name: str
) -> None:
    """With default_transaction_isolation set on every backend (lab run --isolation), the same agreement:
    a nested block naming that level passes asyncpg's check, and the pool's RESET ALL keeps it."""
    async with opened(targets.workspace, default_transaction_isolation="serializable") as serializable:
        await serializable.agree(calls(*CASES[name]))


async def test_a_savepoint_recovers_from_a_unique_violation_as_under_asyncpg(targets: Targets) -> None:
    """The case the old proxy got wrong: the inner block rolls back to its savepoint, the outer commits."""
    _, state = await targets.agree(calls(*CASES["a unique violation inside a savepoint leaves the outer"
                                                   " transaction usable"]))
    assert state[0] == [("record", (("k", 1), ("v", 1))), ("record", (("k", 2), ("v", 2))),
                        ("record", (("k", 5), ("v", 1)))]


async def test_every_transaction_statement_is_one_step_on_the_timeline(targets: Targets) -> None:
    """BEGIN, SAVEPOINT, ROLLBACK TO, RELEASE SAVEPOINT and COMMIT each show as one step, as asyncpg sends them."""
    await targets.agree(calls(Acquire("with", (Block("with", "ok", (
        Block("with", "raise", (Query("conn", "execute", "delete", (1,)),)),
        Block("with", "ok", ()),
    ), "repeatable_read"),))))
    assert targets.trace_rows == [
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        "SAVEPOINT __asyncpg_savepoint_1__",
        "DELETE FROM kv WHERE k = $1  -- $1=1",
        "ROLLBACK TO __asyncpg_savepoint_1__",
        "SAVEPOINT __asyncpg_savepoint_2__",
        "RELEASE SAVEPOINT __asyncpg_savepoint_2__",
        "COMMIT",
    ]


# -- what is not a program of queries: the pool's own rules ---------------------------------------------------


async def released_connection_refuses(pool: Any) -> list[Any]:
    log: list[Any] = []
    async with pool.acquire() as conn:
        tr = conn.transaction()
        await tr.start()
    for call in (lambda: conn.fetchval("SELECT 1"), tr.commit, lambda: pool.release(object())):
        try:
            await call()
        except Exception as exc:
            log.append(described(exc))
    await pool.release(conn)  # released already: nothing happens
    context = pool.acquire()
    async with context:
        try:
            async with context:
                pass
        except Exception as exc:
            log.append(described(exc))
    return log


async def acquire_times_out_when_the_pool_is_exhausted(pool: Any) -> list[Any]:
    held = [await pool.acquire() for _ in range(10)]
    try:
        await pool.acquire(timeout=0.05)
    except Exception as exc:
        return [described(exc)]
    finally:
        for conn in held:
            await pool.release(conn)
    return []


async def statement_timeout_fires(pool: Any) -> list[Any]:
    log: list[Any] = []
    try:
        await pool.fetchval("SELECT pg_sleep(2)", timeout=0.05)
    except Exception as exc:
        log.append(described(exc))
    log.append(await pool.fetchval("SELECT 1"))
    return log


@pytest.mark.parametrize("program", [released_connection_refuses, acquire_times_out_when_the_pool_is_exhausted,
                                     statement_timeout_fires], ids=lambda f: f.__name__)
async def test_the_pools_own_rules_are_asyncpgs(targets: Targets, program: Program) -> None:
    """Use after release, a foreign release, a reused acquire context, an exhausted pool, a timeout that fires."""
    log, _ = await targets.agree(program)
    assert log


# -- what the lab refuses ---------------------------------------------------------------------------------------

LISTEN, TRANSACTION, EXECUTE = "add_listener", "transaction", "execute"  # by name: mypy rightly knows better
REFUSED = [
    ("pool", "copy_records_to_table"), ("pool", "close"), ("pool", "expire_connections"),
    ("conn", "add_listener"), ("conn", "set_type_codec"), ("conn", "copy_from_query"), ("conn", "close"),
    ("conn", "add_log_listener"), ("conn", "reload_schema_state"), ("stmt", "explain"),
]


@pytest.mark.parametrize(("owner", "method"), REFUSED, ids=lambda v: str(v))
async def test_what_the_lab_cannot_run_as_asyncpg_would_is_refused_in_one_line(
    targets: Targets, owner: str, method: str
) -> None:
    """A method asyncpg has but the lab cannot schedule or replay raises Unsupported naming it; one line."""
    db = await targets.bank.db_for("R1", None)
    with pytest.raises(Unsupported) as raised:
        if owner == "pool":
            getattr(db, method)
        else:
            async with db.acquire() as conn:
                target = conn if owner == "conn" else await conn.prepare("SELECT 1")
                getattr(target, method)
    message = str(raised.value)
    assert f".{method}() is not supported by the lab's db" in message and "\n" not in message
    assert db.refused is raised.value


async def test_a_refused_call_fails_the_run_even_if_the_handler_swallows_it(targets: Targets) -> None:
    """The scheduler ends the run with the refusal, so `except Exception: pass` cannot make it count."""
    scheduler = Scheduler(targets.monitor)
    db = await targets.bank.db_for("R2", scheduler)

    async def handler() -> None:
        async with db.acquire() as conn:
            with contextlib.suppress(Exception):  # mypy knows the lab's Connection has no add_listener: ask by name
                await getattr(conn, LISTEN)("channel", print)
            await conn.execute("SELECT 1")

    with pytest.raises(Unsupported, match=r"Connection\.add_listener\(\)"):
        await scheduler.run({"T1": handler}, ScriptedChooser([], strict=False))


async def test_a_named_prepared_statement_is_refused(targets: Targets) -> None:
    """prepare(name=...) would outlive the run on the lab's reused backend, so it is refused, not run."""
    db = await targets.bank.db_for("R3", None)
    async with db.acquire() as conn:
        with pytest.raises(Unsupported, match=r"prepare\(name=\.\.\.\)"):
            await conn.prepare("SELECT 1", name="mine")


async def test_a_method_asyncpg_lacks_is_an_attribute_error_as_in_asyncpg(targets: Targets) -> None:
    """A misspelt or missing method is AttributeError, as asyncpg says it, not a refusal."""
    db: SessionDb = await targets.bank.db_for("R4", None)
    with pytest.raises(AttributeError):
        getattr(db, TRANSACTION)  # a Pool has no transaction(); a connection has
    async with db.acquire() as conn:
        stmt = await conn.prepare("SELECT 1")
        with pytest.raises(AttributeError):
            getattr(stmt, EXECUTE)  # asyncpg's PreparedStatement has no execute()
    assert db.refused is None


LISTENS = '''
import lab

async def handle_charge(db, provider, key, body):
    async with db.acquire() as conn:
        try:
            await conn.add_listener("charges", lambda *args: None)
        except Exception:
            pass  # swallowed: the grader still refuses the file
        return lab.Response(201, {"charge_id": await provider.charge(key, 1000)})
'''


async def test_lab_check_says_a_refused_call_cannot_be_graded_naming_the_line(
    postgres: Postgres, tmp_path: Path
) -> None:
    """`lab check` on a handler calling a refused method: CannotGrade (exit 2), one line with file, line, method."""
    path = tmp_path / "listens.py"
    path.write_text(LISTENS)
    workspace = await Workspace.open(postgres.dsn)
    try:
        with pytest.raises(CannotGrade) as raised:
            await grade(workspace, scenario(1), load(path, "handle_charge"))
    finally:
        await workspace.close()
    message = str(raised.value)
    assert message.startswith(f"{path}, line 7: asyncpg's Connection.add_listener() is not supported"), message
    assert "\n" not in message
