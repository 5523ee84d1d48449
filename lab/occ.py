"""Brooker's table against PostgreSQL: N clients race to update one row with optimistic concurrency.

Marc Brooker's "Exponential Backoff And Jitter" (AWS Architecture Blog, 2015) simulated clients
contending on one optimistic-concurrency resource and counted the calls each backoff policy made.
Here the resource is a real row: each client reads its version, then writes
``UPDATE ... SET version = version + 1 WHERE id = 1 AND version = $v``; zero rows means someone else
wrote first, so it backs off and tries again. Unlike the herd, this runs in real time: the contention
comes from a real server's row lock, and real time is what makes it honest.

Everything lives in a schema of its own with a random name, dropped at the end, so a user's own
database (LAB_DATABASE_URL) is left exactly as it was found.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg
from rich.console import Console
from rich.table import Table

from lab.errors import LabError

# (attempt, previous sleep, base, cap, rng) -> the next sleep, all in seconds; Brooker's formulas.
Policy = Callable[[int, float, float, float, random.Random], float]

POLICIES: dict[str, Policy] = {
    "no jitter": lambda n, _prev, base, cap, _rng: min(cap, base * 2**n),
    "full jitter": lambda n, _prev, base, cap, rng: rng.uniform(0, min(cap, base * 2**n)),
    "equal jitter": lambda n, _prev, base, cap, rng: (t := min(cap, base * 2**n)) / 2 + rng.uniform(0, t / 2),
    "decorrelated jitter": lambda _n, prev, base, cap, rng: min(cap, rng.uniform(base, prev * 3)),
}

TRIAL_DEADLINE_S = 60.0  # a policy that cannot finish in a minute is reported, not waited for


@dataclass(frozen=True)
class OccRow:
    policy: str
    clients: int
    calls: int  # attempted writes (UPDATE statements), Brooker's "calls"
    seconds: float  # wall time from the common start until the last client's write succeeded


async def _client(
    pool: asyncpg.Pool, gate: asyncio.Barrier, policy: Policy, base: float, cap: float, rng: random.Random
) -> int:
    async with pool.acquire() as conn:  # one session per client, as in production
        await gate.wait()  # every client starts at the same moment: they all failed together
        calls, sleep = 0, base
        while True:
            version = await conn.fetchval("SELECT version FROM occ_row WHERE id = 1")
            calls += 1
            done = await conn.execute("UPDATE occ_row SET version = version + 1 WHERE id = 1 AND version = $1", version)
            if done == "UPDATE 1":
                return calls
            sleep = policy(calls - 1, sleep, base, cap, rng)
            await asyncio.sleep(sleep)


async def _trial(pool: asyncpg.Pool, name: str, clients: int, base: float, cap: float, rng: random.Random) -> OccRow:
    await pool.execute("UPDATE occ_row SET version = 0 WHERE id = 1")
    gate = asyncio.Barrier(clients + 1)
    tasks = [asyncio.create_task(_client(pool, gate, POLICIES[name], base, cap, rng)) for _ in range(clients)]
    try:
        async with asyncio.timeout(TRIAL_DEADLINE_S):
            await gate.wait()
            start = time.perf_counter()
            calls = await asyncio.gather(*tasks)
    except TimeoutError:
        raise LabError(
            f"occ: {name} with {clients} clients did not finish in {TRIAL_DEADLINE_S:g} s; is the server overloaded?"
        ) from None
    return OccRow(name, clients, sum(calls), time.perf_counter() - start)


async def run_occ_table(
    console: Console,
    dsn: str,
    *,
    clients: Sequence[int] = (10, 25, 50),
    base_ms: float = 2.0,
    cap_ms: float = 64.0,
    seed: int = 1,
) -> list[OccRow]:
    """Run every policy for every N, print Brooker's table, and return its rows.

    Policies are interleaved per N and the order rotated, so a machine that slows down half-way
    through penalises all of them alike.
    """
    schema = f"lab_occ_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        await admin.execute(f'CREATE TABLE "{schema}".occ_row (id int PRIMARY KEY, version bigint NOT NULL)')
        await admin.execute(f'INSERT INTO "{schema}".occ_row VALUES (1, 0)')
        most = max(clients)
        try:
            pool = await asyncpg.create_pool(dsn, min_size=most, max_size=most, server_settings={"search_path": schema})
        except asyncpg.TooManyConnectionsError:
            raise LabError(
                f"occ: the server refused {most} connections; raise max_connections or use fewer clients"
            ) from None
        rows: list[OccRow] = []
        try:
            rng = random.Random(seed)
            names = list(POLICIES)
            for i, n in enumerate(clients):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    rows.append(await _trial(pool, name, n, base_ms / 1000, cap_ms / 1000, rng))
        finally:
            await pool.close()
    finally:
        try:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await admin.close()
    console.print(occ_table(rows, base_ms=base_ms, cap_ms=cap_ms))
    return rows


def occ_table(rows: Sequence[OccRow], *, base_ms: float, cap_ms: float) -> Table:
    table = Table(
        title=f"optimistic concurrency on one row: calls (attempted writes) and time to finish,"
        f" base {base_ms:g} ms, cap {cap_ms:g} ms",
        title_justify="left",
    )
    table.add_column("N", justify="right")
    for name in POLICIES:
        table.add_column(name, justify="right")
    table.add_column("no jitter ÷ full jitter calls", justify="right")
    cell = {(r.policy, r.clients): r for r in rows}
    for n in sorted({r.clients for r in rows}):
        table.add_row(
            str(n),
            *(f"{cell[p, n].calls} · {cell[p, n].seconds * 1000:.0f} ms" for p in POLICIES),
            f"{ratio(rows, n):.1f}×",
        )
    return table


def ratio(rows: Sequence[OccRow], clients: int) -> float:
    """How many times more writes no jitter attempted than full jitter, at ``clients`` clients."""
    calls = {r.policy: r.calls for r in rows if r.clients == clients}
    return calls["no jitter"] / calls["full jitter"]
