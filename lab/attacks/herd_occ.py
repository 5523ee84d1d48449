"""Brooker's table against PostgreSQL: N clients race to update one row with optimistic concurrency.

Marc Brooker's "Exponential Backoff And Jitter" (AWS Architecture Blog, 2015) simulated clients
contending on one optimistic-concurrency resource and counted the calls each backoff policy made.
Here the resource is a real row: each client reads its version, then writes
``UPDATE ... SET version = version + 1 WHERE id = 1 AND version = $v``; zero rows means someone else
wrote first, so it backs off and tries again. Every read and write is a real statement on the
client's own session, and the server says which writes land; every attempt is recorded in the same
statement as its write, and the calls are counted from that record.

Time is virtual, as in Brooker's simulation and the lab's herd: statements run one at a time, in the
order of a virtual clock (a round trip of 1 ms between a client's read and its write, the window
another client's write can slip into; backoff sleeps as the policy draws them). In real time the
table depended on the machine's load as much as on the policies (a busy machine spreads clients out
by itself, and the suite's comparison failed under load); now one seed is one table, on any machine.

Everything lives in a schema of its own with a random name, dropped at the end, so a user's own
database (LAB_DATABASE_URL) is left exactly as it was found.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from rich.console import Console
from rich.table import Table

from lab.errors import LabError
from lab.postgres.workspace import create_owned, drop_owned, reap_orphans

# (attempt, previous sleep, base, cap, rng) -> the next sleep, all in seconds; Brooker's formulas.
Policy = Callable[[int, float, float, float, random.Random], float]

POLICIES: dict[str, Policy] = {
    "no jitter": lambda n, _prev, base, cap, _rng: min(cap, base * 2**n),
    "full jitter": lambda n, _prev, base, cap, rng: rng.uniform(0, min(cap, base * 2**n)),
    "equal jitter": lambda n, _prev, base, cap, rng: (t := min(cap, base * 2**n)) / 2 + rng.uniform(0, t / 2),
    "decorrelated jitter": lambda _n, prev, base, cap, rng: min(cap, rng.uniform(base, prev * 3)),
}

TRIAL_DEADLINE_S = 60.0  # a policy that cannot finish in a minute is reported, not waited for
ROUND_TRIP_S = 0.001  # virtual time from a client's read of the version to its write: the race window

# The attempt and its record in one statement: the count of calls is the database's, not the client's.
WRITE = """
WITH written AS (UPDATE occ_row SET version = version + 1 WHERE id = 1 AND version = $1 RETURNING 1)
INSERT INTO occ_calls (client, written) SELECT $2, EXISTS (SELECT FROM written) RETURNING written
"""


@dataclass(frozen=True)
class OccRow:
    policy: str
    clients: int
    calls: int  # attempted writes (UPDATE statements), Brooker's "calls", counted from occ_calls
    seconds: float  # virtual time from the common start until the last client's write succeeded


async def _trial(pool: asyncpg.Pool, name: str, clients: int, base: float, cap: float, rng: random.Random) -> OccRow:
    """Every client reads at virtual time 0 (they all failed together), then each runs when the clock says.

    A heap of (when, order, client) is the schedule: ties go in the order they were scheduled, so
    clients that slept alike read alike, then write alike, as they would on a real server.
    """
    await pool.execute("UPDATE occ_row SET version = 0 WHERE id = 1; DELETE FROM occ_calls")
    policy = POLICIES[name]
    conns: list[PoolConnectionProxy] = []  # one session per client, as in production
    try:
        for _ in range(clients):  # each one held goes back in the finally, even if the next is never had
            conns.append(await pool.acquire())
        async with asyncio.timeout(TRIAL_DEADLINE_S):
            due = [(0.0, c, c) for c in range(clients)]
            order = itertools.count(clients)
            seen: dict[int, int] = {}  # client -> the version it read, until it writes
            calls, sleeps, finished = [0] * clients, [base] * clients, 0.0
            while due:
                now, _, c = heapq.heappop(due)
                if c not in seen:
                    seen[c] = await conns[c].fetchval("SELECT version FROM occ_row WHERE id = 1")
                    heapq.heappush(due, (now + ROUND_TRIP_S, next(order), c))
                    continue
                calls[c] += 1
                if await conns[c].fetchval(WRITE, seen.pop(c), c):
                    finished = now
                    continue
                sleeps[c] = policy(calls[c] - 1, sleeps[c], base, cap, rng)
                heapq.heappush(due, (now + sleeps[c], next(order), c))
            counted: int = await conns[0].fetchval("SELECT count(*) FROM occ_calls")
    except TimeoutError:
        raise LabError(
            f"occ: {name} with {clients} clients did not finish in {TRIAL_DEADLINE_S:g} s; is the server overloaded?"
        ) from None
    finally:
        await _give_back(pool, conns)
    return OccRow(name, clients, counted, finished)


async def _give_back(pool: asyncpg.Pool, conns: Sequence[PoolConnectionProxy]) -> None:
    """Every session back to the pool, even when a Ctrl-C lands on the way (then raised once all are back).

    Each release is shielded and goes on, but a loop cut at one leaves the rest held for ever, and the
    pool's close() waits for every one: make soak saw ``herd --occ`` and ``run 2`` hang after SIGTERM there.
    """
    interrupted = False
    for conn in conns:
        try:
            await pool.release(conn)
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError


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

    Policies are interleaved per N and the order rotated (one random stream runs through them all).
    """
    schema = f"lab_occ_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(dsn)
    try:
        await reap_orphans(admin)
        await create_owned(admin, schema)  # its creator recorded: if this lab is killed, the next one drops it
        await admin.execute(f'CREATE TABLE "{schema}".occ_row (id int PRIMARY KEY, version bigint NOT NULL)')
        await admin.execute(f'INSERT INTO "{schema}".occ_row VALUES (1, 0)')
        await admin.execute(f'CREATE TABLE "{schema}".occ_calls (call_no bigserial PRIMARY KEY, client int NOT NULL,'
                            ' written bool NOT NULL)')
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
        await drop_owned(dsn, admin, schema)
    console.print(occ_table(rows, base_ms=base_ms, cap_ms=cap_ms))
    return rows


def occ_table(rows: Sequence[OccRow], *, base_ms: float, cap_ms: float) -> Table:
    table = Table(
        title=f"optimistic concurrency on one row: calls (attempted writes) and virtual time to finish,"
        f" base {base_ms:g} ms, cap {cap_ms:g} ms, {ROUND_TRIP_S * 1000:g} ms from read to write",
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
