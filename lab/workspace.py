"""A run's private corner of a server: two schemas of its own, dropped at the end.

On a user's server (``LAB_DATABASE_URL``) the lab must touch nothing it did not create, so every
table lives in a schema with a random name: one for the scenario's tables (the handler's
``search_path``), one for the provider's ledger, out of the handler's reach.
"""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg

from lab.errors import LabError

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


class Workspace:
    """Owns the schemas; hands out connections whose ``search_path`` is the scenario schema."""

    def __init__(self, dsn: str, admin: asyncpg.Connection, schema: str) -> None:
        self.dsn = dsn
        self.admin = admin
        self.schema = schema
        self.ledger = f"{schema}_provider"
        self._tables: list[str] = []
        self._seed = ""

    @classmethod
    async def open(cls, dsn: str) -> Workspace:
        try:
            admin = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise LabError(f"cannot connect to postgres: {exc}") from exc
        schema = f"lab_{secrets.token_hex(4)}"
        workspace = cls(dsn, admin, schema)
        try:
            await admin.execute(f"CREATE SCHEMA {schema}; CREATE SCHEMA {workspace.ledger}")
            await admin.execute(f"SET search_path = {workspace.ledger}; {LEDGER_SQL}")
        except BaseException:  # Ctrl-C between the two statements must not leave a schema behind
            await workspace.close()
            raise
        return workspace

    async def connect(self, **kwargs: Any) -> asyncpg.Connection:
        """A new backend for a session or a stress client, confined to the scenario schema."""
        settings = {"search_path": self.schema, "application_name": "idempotency-lab"}
        try:
            return await asyncpg.connect(self.dsn, server_settings=settings, **kwargs)
        except asyncpg.TooManyConnectionsError:
            limit = await self.admin.fetchval("SHOW max_connections")
            raise LabError(
                f"the server refused another connection (max_connections = {limit}): stress opens one per"
                " session, so lower --concurrency or raise max_connections"
            ) from None

    async def install(self, schema_sql: str, seed_sql: str = "") -> None:
        """(Re)create the scenario's tables from its SCHEMA; ``reset`` will re-run the seed."""
        await self.admin.execute(f"DROP SCHEMA {self.schema} CASCADE; CREATE SCHEMA {self.schema}")
        await self.admin.execute(f"SET search_path = {self.schema}; {schema_sql}")
        self._tables = [
            f"{r['schemaname']}.{r['tablename']}"
            for r in await self.admin.fetch(
                "SELECT schemaname, tablename FROM pg_tables WHERE schemaname = ANY($1::text[])",
                [self.schema, self.ledger],
            )
        ]
        self._seed = seed_sql
        await self.reset()

    async def reset(self) -> None:
        """Fresh state for one replay: every table emptied, the seed rows back."""
        # DELETE, not TRUNCATE: on a handful of rows it is several times faster (no new relfilenodes).
        deletes = "".join(f"DELETE FROM {table};" for table in self._tables)
        await self.admin.execute(f"{deletes} SELECT setval('{self.ledger}.charge_numbers', 1, false)")
        if self._seed:
            await self.admin.execute(f"SET search_path = {self.schema}; {self._seed}")

    async def close(self) -> None:
        """Drop exactly the two schemas this workspace created, nothing else.

        A fresh connection does it: after Ctrl-C the admin connection may be stuck mid-query.
        """
        self.admin.terminate()
        conn = await asyncpg.connect(self.dsn, timeout=5)
        try:
            await conn.execute(
                f"DROP SCHEMA IF EXISTS {self.schema} CASCADE; DROP SCHEMA IF EXISTS {self.ledger} CASCADE"
            )
        finally:
            await conn.close()
