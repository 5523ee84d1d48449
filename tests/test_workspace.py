"""A run's schemas on a shared server: each records its creator, and only a provably dead creator's are reaped;
and a reset gives every replay the same start, also for tables a user's own migrations made."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import psutil
import pytest

from lab.postgres.provision import Postgres
from lab.postgres.workspace import Creator, Workspace, reap_orphans


@pytest.fixture
async def admin(postgres: Postgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        yield conn
    finally:
        await conn.close()


def _dead_creator() -> Creator:
    """The record a process would have written, taken while it ran; it has exited since."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        started = psutil.Process(child.pid).create_time()
    finally:
        child.communicate(b"")
    return dataclasses.replace(Creator.me(), pid=child.pid, started=started)


async def test_both_schemas_of_a_workspace_record_this_process_as_their_creator(
    postgres: Postgres, admin: asyncpg.Connection
) -> None:
    """The scenario schema and the ledger schema each carry a comment naming this host, pid and start time."""
    workspace = await Workspace.open(postgres.dsn)
    try:
        notes = await admin.fetch(
            "SELECT nspname, obj_description(oid, 'pg_namespace') AS note FROM pg_namespace"
            " WHERE nspname = ANY($1::text[]) ORDER BY 1",
            [workspace.schema, workspace.ledger],
        )
    finally:
        await workspace.close()
    assert [n["nspname"] for n in notes] == [workspace.schema, workspace.ledger]
    assert [Creator.of(n["note"]) for n in notes] == [Creator.me()] * 2


async def test_install_keeps_the_creator_record_the_scenario_schema_had(
    postgres: Postgres, admin: asyncpg.Connection
) -> None:
    """Installing tables makes the scenario schema anew with the record it had (the lab's, even when a grading
    child installs): a lab killed after an install leaves schemas the next one can prove orphaned."""
    note = "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1"
    workspace = await Workspace.open(postgres.dsn)
    try:
        await workspace.install("CREATE TABLE t (id int)")
        mine = Creator.of(await admin.fetchval(note, workspace.schema))
        parent = dataclasses.replace(Creator.me(), pid=Creator.me().pid + 1)  # as lab check's child sees its lab
        await admin.execute(f"COMMENT ON SCHEMA {workspace.schema} IS '{parent.comment()}'")
        await workspace.install("CREATE TABLE t (id int)")
        copied = Creator.of(await admin.fetchval(note, workspace.schema))
    finally:
        await workspace.close()
    assert mine == Creator.me()
    assert copied == parent


async def test_next_start_drops_only_schemas_whose_creator_is_provably_gone(admin: asyncpg.Connection) -> None:
    """Dead and reused pids are reaped, in one line; a live lab's, another host's or container's, and foreign
    schemas are left alone."""
    me, dead = Creator.me(), _dead_creator()
    tag = secrets.token_hex(3)
    planted = {
        f"lab_{tag}01": dead.comment(),  # killed
        f"lab_{tag}01_provider": dead.comment(),
        f"lab_occ_{tag}02": dead.comment(),  # lab herd --occ, killed
        f"lab_{tag}03": dataclasses.replace(me, started=me.started - 3600).comment(),  # pid reused since
        f"lab_{tag}04": me.comment(),  # a live lab: this very process
        f"lab_{tag}05": dataclasses.replace(dead, host="another-host").comment(),  # unprovable
        f"lab_{tag}06": dataclasses.replace(dead, pid_ns="pid:[1]").comment(),  # another container
        f"lab_{tag}07": "a user's own comment",
        f"lab_{tag}08": None,
        f"lab_{tag}zz": dead.comment(),  # not a name the lab gives
    }
    for name, note in planted.items():
        await admin.execute(f'CREATE SCHEMA "{name}"')
        if note is not None:
            await admin.execute(f"COMMENT ON SCHEMA \"{name}\" IS $${note}$$")
    said: list[str] = []
    try:
        dropped = await reap_orphans(admin, said.append)
    finally:
        for name in planted:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{name}"')
    ours = [name for name in dropped if tag in name]
    assert ours == [f"lab_{tag}01", f"lab_{tag}01_provider", f"lab_{tag}03", f"lab_occ_{tag}02"]
    assert len(said) == 1 and said[0].startswith("removed ") and all(name in said[0] for name in ours)
    assert f"pid {dead.pid} on {dead.host}" in said[0]



async def test_a_ctrl_c_while_the_schemas_are_being_created_leaves_none_behind(
    postgres: Postgres, admin: asyncpg.Connection
) -> None:
    """Cut while its CREATE SCHEMA waits in the server, a workspace's clean-up must stop that backend before
    it drops: left running, the CREATE commits after the DROP, and the schemas stay in a user's database.
    The window is milliseconds wide; a lock on pg_namespace holds the CREATE in it."""
    blocker = await asyncpg.connect(postgres.dsn)
    opening: asyncio.Task[Workspace] | None = None
    try:
        await blocker.execute("BEGIN; LOCK TABLE pg_catalog.pg_namespace IN SHARE MODE")
        opening = asyncio.ensure_future(Workspace.open(postgres.dsn))
        creating, statement = await _backend_waiting_on("CREATE SCHEMA \"lab\\_%", admin, opening)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
    finally:
        await blocker.close()  # the lock goes: a CREATE still running commits now
        if opening is not None and not opening.done():
            opening.cancel()
    names = re.findall(r'CREATE SCHEMA "(lab_[0-9a-f]+(?:_provider)?)"', statement)
    assert await _gone(creating, admin), f"the cut workspace's backend {creating} still runs"
    left = await admin.fetch("SELECT nspname FROM pg_namespace WHERE nspname = ANY($1::text[])", names)
    assert names and left == []


async def _backend_waiting_on(
    query_like: str, admin: asyncpg.Connection, task: asyncio.Task[Workspace]
) -> tuple[int, str]:
    """The pid and statement of the backend that waits on a lock with ``query_like`` (polled: nothing else tells)."""
    deadline = asyncio.get_running_loop().time() + 10
    while not task.done() and asyncio.get_running_loop().time() < deadline:
        row = await admin.fetchrow(
            "SELECT pid, query FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1", query_like
        )
        if row is not None:
            return int(row["pid"]), str(row["query"])
    raise AssertionError(f"no backend came to wait on {query_like!r}")


async def _gone(pid: int, admin: asyncpg.Connection) -> bool:
    """Whether the backend has exited, waiting up to 10 s for one that is finishing its statement."""
    deadline = asyncio.get_running_loop().time() + 10
    while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
        if asyncio.get_running_loop().time() > deadline:
            return False
    return True

MIGRATED = """
CREATE TABLE customers (
    id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE
);
CREATE TABLE orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers,
    cents       int NOT NULL,
    euros       numeric GENERATED ALWAYS AS (cents / 100.0) STORED
);
INSERT INTO customers (name) VALUES ('ada'), ('grace');
INSERT INTO orders (customer_id, cents) VALUES (1, 1500);
"""


async def _migrate(workspace: Workspace, sql: str) -> None:
    """What the plugin does with a user's migrations: run them in the scenario schema, then keep the result."""
    await workspace.install("")
    await workspace.admin.execute(f"SET search_path = {workspace.schema}; {sql}")
    await workspace.keep()


async def _state(workspace: Workspace) -> list[tuple[object, ...]]:
    s = workspace.schema
    rows = await workspace.admin.fetch(
        f"SELECT 'customer', id, name, NULL::numeric FROM {s}.customers"
        f" UNION ALL SELECT 'order', id, customer_id::text, euros FROM {s}.orders ORDER BY 1, 2"
    )
    return [tuple(r) for r in rows]


async def test_reset_restores_the_rows_the_migrations_left(workspace: Workspace) -> None:
    """Rows a migration inserted come back after a replay deleted or added some, foreign keys and all."""
    await _migrate(workspace, MIGRATED)
    before = await _state(workspace)
    s = workspace.schema
    await workspace.admin.execute(
        f"DELETE FROM {s}.orders; DELETE FROM {s}.customers WHERE name = 'grace';"
        f" INSERT INTO {s}.orders (customer_id, cents) VALUES (1, 99), (1, 98)"
    )
    await workspace.reset()
    assert await _state(workspace) == before == [
        ("customer", 1, "ada", None), ("customer", 2, "grace", None), ("order", 1, "1", 15),
    ]


async def test_reset_puts_sequences_back_where_the_migrations_left_them(workspace: Workspace) -> None:
    """Every replay numbers its new rows alike, so a timeline reads the same ids each time."""
    await _migrate(workspace, MIGRATED)
    s = workspace.schema
    drawn = []
    for _ in range(2):
        drawn.append(await workspace.admin.fetchval(
            f"INSERT INTO {s}.orders (customer_id, cents) VALUES (2, 700) RETURNING id"
        ))
        drawn.append(await workspace.admin.fetchval(f"INSERT INTO {s}.customers (name) VALUES ('linus') RETURNING id"))
        await workspace.reset()
    assert drawn == [2, 3, 2, 3]


async def test_a_sequence_never_used_starts_again_at_its_start(workspace: Workspace) -> None:
    """A table the migrations left empty draws its first id at every replay."""
    await _migrate(workspace, "CREATE TABLE events (id serial PRIMARY KEY, what text)")
    s = workspace.schema
    drawn = []
    for _ in range(2):
        drawn.append(await workspace.admin.fetchval(f"INSERT INTO {s}.events (what) VALUES ('x') RETURNING id"))
        await workspace.reset()
    assert drawn == [1, 1]


async def test_tables_whose_foreign_keys_form_a_cycle_are_emptied_too(workspace: Workspace) -> None:
    """Two tables referring to each other cannot be deleted one before the other; reset still empties both."""
    await _migrate(workspace, """
        CREATE TABLE a (id int PRIMARY KEY, b_id int);
        CREATE TABLE b (id int PRIMARY KEY, a_id int REFERENCES a);
        ALTER TABLE a ADD FOREIGN KEY (b_id) REFERENCES b;
    """)
    s = workspace.schema
    await workspace.admin.execute(f"INSERT INTO {s}.a VALUES (1, NULL); INSERT INTO {s}.b VALUES (1, 1)")
    await workspace.reset()
    assert await workspace.admin.fetchval(f"SELECT (SELECT count(*) FROM {s}.a) + (SELECT count(*) FROM {s}.b)") == 0


async def test_keeping_twice_keeps_the_latest_state(workspace: Workspace) -> None:
    """A second keep (a test's second attack, after it added rows) replaces the first copy, not adds to it."""
    await _migrate(workspace, MIGRATED)
    s = workspace.schema
    await workspace.admin.execute(f"INSERT INTO {s}.customers (name) VALUES ('linus')")
    await workspace.keep()
    await workspace.reset()
    await workspace.reset()
    assert [r[2] for r in await _state(workspace) if r[0] == "customer"] == ["ada", "grace", "linus"]
