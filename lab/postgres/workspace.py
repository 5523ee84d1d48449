"""A run's private corner of a server: two schemas of its own, dropped at the end.

On a user's server (``LAB_DATABASE_URL``) the lab must touch nothing it did not create, so every
table lives in a schema with a random name: one for the scenario's tables (the handler's
``search_path``), one for the provider's ledger, out of the handler's reach.

A lab killed with SIGKILL cannot drop them, so each schema records who created it (a COMMENT: host,
boot, pid namespace, pid and the process's start time) and the next lab to start on that database
drops those whose creator is provably gone. Two labs may share a database: a schema whose creator
runs, or runs where this lab cannot see (another host, another container), is never touched. The
idea is pytest's numbered temp dirs, which a lock file names the owner of, and the lab's own
embedded server dirs (``lab.postgres.provision._remove_stale_dirs``).
"""

from __future__ import annotations

import asyncio
import graphlib
import json
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from lab.errors import LabError

#: The levels a run's sessions may be put at (``lab run N --isolation``), by their names on the command
#: line; the values are what ``default_transaction_isolation`` takes. READ UNCOMMITTED is left out: in
#: PostgreSQL it behaves exactly as READ COMMITTED.
ISOLATION_LEVELS = {
    "read-committed": "read committed",
    "repeatable-read": "repeatable read",
    "serializable": "serializable",
}

#: The names the lab gives its schemas: lab_<hex> and lab_<hex>_provider (a run), lab_occ_<hex> (lab herd --occ).
OWNED_NAME = r"^lab_(occ_)?[0-9a-f]{8}(_provider)?$"
_NOTE = "idempotency-lab schema, dropped when its run ends; created by "

LEDGER_SQL = """
CREATE TABLE provider_charges (
    charge_id       text PRIMARY KEY,
    reference       text NOT NULL,
    amount_cents    bigint NOT NULL,
    idempotency_key text UNIQUE            -- NULLs are distinct: no key, no dedup
);
CREATE TABLE provider_calls (
    call_no         bigserial PRIMARY KEY,
    session         text,
    reference       text NOT NULL,
    amount_cents    bigint NOT NULL,
    idempotency_key text,
    outcome         text NOT NULL,         -- charged | replayed | error 503 | ...
    charge_id       text
);
CREATE SEQUENCE charge_numbers;
CREATE TABLE client_answers (          -- what each client got on the wire, recorded by the lab, not the handler
    answer_no       bigserial PRIMARY KEY,
    session         text NOT NULL,
    idempotency_key text,
    status          int NOT NULL,          -- 500 when the handler raised
    body            jsonb NOT NULL
);
"""


@dataclass(frozen=True)
class Creator:
    """Who created a schema, recorded so that a later lab can prove that process gone, or not."""

    host: str
    boot: str  # this kernel boot: a pid recorded before a reboot names nothing now
    pid_ns: str  # the pid namespace: the same pid in another container is another process
    pid: int
    started: float  # the process's start time (seconds since the epoch): a reused pid has a later one

    @classmethod
    def me(cls) -> Creator:
        return cls(socket.gethostname(), *_boot_and_pid_namespace(), os.getpid(), psutil.Process().create_time())

    def comment(self) -> str:
        return _NOTE + json.dumps(asdict(self))

    @classmethod
    def of(cls, comment: str | None) -> Creator | None:
        """The creator a schema's comment records; None for a comment the lab did not write."""
        if not comment or not comment.startswith(_NOTE):
            return None
        try:
            return cls(**json.loads(comment.removeprefix(_NOTE)))
        except (ValueError, TypeError):
            return None

    def gone(self) -> bool:
        """Provably gone: same host, boot and pid namespace as us, and its pid is free, a zombie, or a later process.

        Anything this process cannot see is alive as far as it knows (another host may be another
        machine with a lab running), so its schemas stay.
        """
        here = Creator.me()
        if (self.host, self.boot, self.pid_ns) != (here.host, here.boot, here.pid_ns):
            return False
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
            # Start times are read from the boot time, which the kernel may shift by a second as the clock is set.
            started: float = process.create_time()
            return abs(started - self.started) > 1.0
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:  # access denied: not provably anything
            return False

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _boot_and_pid_namespace() -> tuple[str, str]:
    if sys.platform != "linux":
        return f"booted at {psutil.boot_time():.0f}", ""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return boot_id, os.readlink("/proc/self/ns/pid")


async def create_owned(conn: asyncpg.Connection, *schemas: str) -> None:
    """Create the schemas with their creator recorded on each, all or none (one implicit transaction).

    A role that may not create schemas gets one line naming the privilege, not a driver traceback.
    """
    note = Creator.me().comment().replace("'", "''")
    sql = "".join(f'CREATE SCHEMA "{name}"; COMMENT ON SCHEMA "{name}" IS \'{note}\';' for name in schemas)
    try:
        await conn.execute(sql)
    except asyncpg.InsufficientPrivilegeError:
        user, database = await conn.fetchrow("SELECT current_user, current_database()") or ("?", "?")
        raise LabError(
            f"role {user} lacks the CREATE privilege on database {database}, and the lab works only inside schemas"
            f" it creates: GRANT CREATE ON DATABASE {database} TO {user}, or name another database"
        ) from None


async def reap_orphans(conn: asyncpg.Connection, notify: Callable[[str], None] | None = None) -> list[str]:
    """Drop the lab schemas whose creator is provably gone; say so in one line; return their names.

    Only schemas with the lab's names, a creator record the lab wrote, and an owner this role acts
    for are considered. A schema still locked (its killed lab's backends have not all noticed yet)
    is left for the next start.
    """
    rows = await conn.fetch(
        "SELECT nspname, obj_description(oid, 'pg_namespace') AS note FROM pg_namespace"
        " WHERE nspname ~ $1 AND pg_has_role(nspowner, 'MEMBER') ORDER BY nspname",
        OWNED_NAME,
    )
    gone = {row["nspname"]: creator for row in rows if (creator := Creator.of(row["note"])) and creator.gone()}
    dropped = []
    for name in gone:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '1s'; DROP SCHEMA IF EXISTS \"{name}\" CASCADE")
        except asyncpg.PostgresError:  # locked, or dropped by another lab reaping at the same moment
            continue
        dropped.append(name)
    if dropped:
        creators = sorted({gone[name].describe() for name in dropped})
        (notify or _to_stderr)(
            f"removed {len(dropped)} schema{'s' if len(dropped) > 1 else ''} left by"
            f" {'a lab that is' if len(creators) == 1 else f'{len(creators)} labs that are'} gone"
            f" ({', '.join(creators)}): {', '.join(dropped)}"
        )
    return dropped


async def _end_backend(conn: asyncpg.Connection, pid: int, within_s: float = 5.0) -> None:
    """Terminate a backend of ours (same user, same database) and wait until it has exited: what it was
    running is then committed or rolled back for good. (pg_terminate_backend waits itself from PostgreSQL 14.)"""
    ours = "FROM pg_stat_activity WHERE pid = $1 AND usename = current_user AND datname = current_database()"
    await conn.execute(f"SELECT pg_terminate_backend(pid) {ours}", pid)
    deadline = asyncio.get_running_loop().time() + within_s
    while await conn.fetchval(f"SELECT count(*) {ours}", pid):
        if asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.005)


async def drop_owned(dsn: str, admin: asyncpg.Connection, *schemas: str) -> None:
    """Drop the schemas ``admin`` created, and close it. A Ctrl-C that lands meanwhile waits for it, then goes
    on: cut there, it left both schemas in a user's database (make soak, `run 4 --explore`, once in 50)."""
    drop = asyncio.ensure_future(_drop_owned(dsn, admin, schemas))
    try:
        await asyncio.shield(drop)
    except asyncio.CancelledError:
        await drop
        raise


async def _drop_owned(dsn: str, admin: asyncpg.Connection, schemas: tuple[str, ...]) -> None:
    """A fresh connection does it: after Ctrl-C, ``admin`` may be stuck mid-query. Its backend goes first: cut
    while creating the schemas, it runs on, and its CREATE would commit after this DROP, leaving both in a
    user's database (tests/test_workspace.py holds a CREATE on a lock to show it)."""
    admin_backend = None if admin.is_closed() else admin.get_server_pid()  # closed: its pid may be another's now
    admin.terminate()
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        if admin_backend is not None:
            await _end_backend(conn, admin_backend)
        await conn.execute("".join(f'DROP SCHEMA IF EXISTS "{name}" CASCADE;' for name in schemas))
    finally:
        await conn.close()


def _to_stderr(line: str) -> None:
    print(f"lab: {line}", file=sys.stderr, flush=True)


class Workspace:
    """Owns the schemas; hands out connections whose ``search_path`` is the scenario schema."""

    def __init__(self, dsn: str, admin: asyncpg.Connection, schema: str) -> None:
        self.dsn = dsn
        self.admin = admin
        self.schema = schema
        self.ledger = f"{schema}_provider"
        self._tables: list[str] = []
        self._cyclic = False
        self._seed = ""
        self._kept = ""

    @classmethod
    async def open(cls, dsn: str, notify: Callable[[str], None] | None = None) -> Workspace:
        """Reap what killed labs left (``notify`` hears about it; default: a line on stderr), then create ours."""
        try:
            admin = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise LabError(f"cannot connect to postgres: {exc}") from exc
        schema = f"lab_{secrets.token_hex(4)}"
        workspace = cls(dsn, admin, schema)
        try:
            await reap_orphans(admin, notify)
            await create_owned(admin, schema, workspace.ledger)
            await admin.execute(f"SET search_path = {workspace.ledger}; {LEDGER_SQL}")
        except BaseException:  # Ctrl-C between the statements must not leave a schema behind
            await workspace.close()
            raise
        return workspace

    async def connect(self, *, isolation: str | None = None, **kwargs: Any) -> asyncpg.Connection:
        """A new backend for a session or a stress client, confined to the scenario schema.

        ``isolation`` (a key of :data:`ISOLATION_LEVELS`) becomes the backend's
        ``default_transaction_isolation``: every transaction it runs takes that level, the implicit one
        around a lone statement included, unless the handler names another in its own BEGIN.
        """
        settings = {"search_path": self.schema, "application_name": "idempotency-lab"}
        if isolation is not None:
            settings["default_transaction_isolation"] = ISOLATION_LEVELS[isolation]
        try:
            return await asyncpg.connect(self.dsn, server_settings=settings, **kwargs)
        except asyncpg.TooManyConnectionsError:
            limit = await self.admin.fetchval("SHOW max_connections")
            raise LabError(
                f"the server refused another connection (max_connections = {limit}): stress opens one per"
                " session, so lower --concurrency or raise max_connections"
            ) from None

    def sessions(self, isolation: str | None = None) -> Callable[[], Awaitable[asyncpg.Connection]]:
        """The connector a run's sessions use: ``connect`` at ``isolation`` (None: the server's default)."""

        async def connect() -> asyncpg.Connection:
            return await self.connect(isolation=isolation)

        return connect

    async def install(self, schema_sql: str, seed_sql: str = "") -> None:
        """(Re)create the scenario's tables from its SCHEMA; ``reset`` will re-run the seed.

        The schema is made anew with the creator record it had, in one transaction: without it, a lab
        killed after this line left a schema no later lab could prove orphaned, which stayed for good.
        The record is copied, not written anew: ``lab check``'s grading child calls this on a schema
        that its parent, the lab, created and drops.
        """
        await self.admin.execute(
            f"""DO $$ DECLARE note text := obj_description('{self.schema}'::regnamespace, 'pg_namespace'); BEGIN
                DROP SCHEMA {self.schema} CASCADE; CREATE SCHEMA {self.schema};
                EXECUTE format('COMMENT ON SCHEMA {self.schema} IS %L', note);
            END $$"""
        )
        await self.admin.execute(f"SET search_path = {self.schema}; {schema_sql}")
        self._tables = await self._tables_in_delete_order()
        self._seed = seed_sql
        self._kept = ""
        await self.reset()

    async def keep(self) -> None:
        """What the scenario schema holds now is what every :meth:`reset` restores: rows and sequences.

        For tables made some other way than :meth:`install`: the pytest plugin runs a user's own
        migrations, which may insert reference rows and leave sequences past their start. Each
        table's rows are copied into the ledger schema, out of the handler's reach, and put back
        after every reset, parents before children; generated columns are left to recompute.
        """
        self._tables = await self._tables_in_delete_order()
        restore = []
        for number, table in enumerate(reversed(self._tables)):
            mine = table.partition(".")[0] == self.schema
            if not mine or not await self.admin.fetchval(f"SELECT EXISTS (TABLE {table})"):
                continue
            columns = ", ".join(
                await self.admin.fetchval(
                    "SELECT array_agg(quote_ident(attname) ORDER BY attnum) FROM pg_attribute"
                    " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = ''",
                    table,
                )
            )
            copy = f"{self.ledger}.kept_{number}"
            await self.admin.execute(f"DROP TABLE IF EXISTS {copy}; CREATE TABLE {copy} AS TABLE {table}")
            restore.append(f"INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} FROM {copy};")
        for row in await self.admin.fetch(
            "SELECT format('%I.%I', schemaname, sequencename) AS name, last_value, start_value FROM pg_sequences"
            " WHERE schemaname = $1",
            self.schema,
        ):
            at, called = (row["last_value"], "true") if row["last_value"] is not None else (row["start_value"], "false")
            restore.append(f"SELECT setval('{row['name']}', {at}, {called});")
        self._kept = "".join(restore)

    async def reset(self) -> None:
        """Fresh state for one replay: every table emptied, the kept rows and the seed rows back."""
        # DELETE, not TRUNCATE: on a handful of rows it is several times faster (no new relfilenodes).
        # Children before parents, so that a foreign key never refuses; a cycle of them is truncated at once.
        deletes = "".join(f"DELETE FROM {table};" for table in self._tables)
        if self._tables and self._cyclic:
            deletes = f"TRUNCATE {', '.join(self._tables)};"
        await self.admin.execute(f"{deletes} SELECT setval('{self.ledger}.charge_numbers', 1, false); {self._kept}")
        if self._seed:
            await self.admin.execute(f"SET search_path = {self.schema}; {self._seed}")

    async def _tables_in_delete_order(self) -> list[str]:
        """The workspace's tables, each before the tables its foreign keys point at (graphlib orders them)."""
        schemas = [self.schema, self.ledger]
        tables = [
            r["name"]
            for r in await self.admin.fetch(
                "SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_tables"
                " WHERE schemaname = ANY($1::text[]) AND NOT (schemaname = $2 AND starts_with(tablename, 'kept_'))"
                " ORDER BY schemaname, tablename",
                schemas, self.ledger,
            )
        ]
        refers: dict[str, set[str]] = {table: set() for table in tables}
        for r in await self.admin.fetch(
            """WITH t AS (SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS name FROM pg_class c
                          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ANY($1::text[]))
               SELECT p.name AS parent, c.name AS child FROM pg_constraint k
               JOIN t c ON c.oid = k.conrelid JOIN t p ON p.oid = k.confrelid
               WHERE k.contype = 'f' AND k.conrelid <> k.confrelid""",
            schemas,
        ):
            if r["parent"] in refers:
                refers[r["parent"]].add(r["child"])  # a parent is deleted after every table that refers to it
        try:
            ordered = list(graphlib.TopologicalSorter(refers).static_order())
        except graphlib.CycleError:
            self._cyclic = True
            return tables
        self._cyclic = False
        return ordered

    async def close(self) -> None:
        """Drop exactly the two schemas this workspace created, nothing else."""
        await drop_owned(self.dsn, self.admin, self.schema, self.ledger)
