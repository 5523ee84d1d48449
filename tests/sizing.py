"""Tests that open many sessions at once, sized to the server they run on, and a record of what was used.

The embedded server allows 400 connections; a server a user names (``LAB_DATABASE_URL``) may be a
stock one with ``max_connections = 100``, some of them taken by others. A stress test asks for the
sessions it wants and gets as many as the server has free, and ``make test`` ends by listing what
each such test used (conftest's terminal summary), so a run on a small server says so.
"""

from __future__ import annotations

import asyncpg

#: One line per sized test, printed at the end of the run.
USED: list[str] = []

#: Connections the test's lab opens beside its sessions (the provider's pool of up to 10, a monitor),
#: and a margin for the other clients of a shared server that may connect meanwhile.
BESIDE = 15
FEWEST = 10  # below this a stress test proves little: it fails rather than pass on a trickle


async def free_sessions(dsn: str, wanted: int, test: str) -> int:
    """How many sessions ``test`` may open at once, up to ``wanted``; recorded in USED."""
    conn = await asyncpg.connect(dsn)
    try:
        limit = int(await conn.fetchval("SHOW max_connections"))
        reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
        # PostgreSQL 16 adds reserved_connections (for pg_use_reserved_connections); absent before.
        reserved += int(await conn.fetchval("SELECT coalesce(current_setting('reserved_connections', true), '0')"))
        in_use = int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"))
    finally:
        await conn.close()
    free = limit - reserved - in_use - BESIDE
    used = min(wanted, free)
    assert used >= FEWEST, (
        f"{test}: the server has {free} connections free (max_connections {limit}, {reserved} reserved,"
        f" {in_use} in use, {BESIDE} kept for the lab itself); stress needs at least {FEWEST}"
    )
    USED.append(
        f"{test}: {used} sessions{' (as asked)' if used == wanted else f' of {wanted} asked'}; max_connections {limit},"
        f" {reserved} reserved, {in_use} in use"
    )
    return used
