"""`lab run N --isolation LEVEL`: every session's transactions at that level, the lab's own at the server's default.

The level is read back from the server (``SHOW transaction_isolation``) inside the very statements a
handler sends, and its effect from the provider's ledger and the clients' answers, never from a flag.
"""

import os
import subprocess
import sys
from typing import Any

import asyncpg
import pytest

import fixes.s4_inbox_double_apply as fixed_s4
import lab
import scenarios.s3_lost_transition as buggy_s3
from lab.attacks.charge import ChargeLab, duplicates
from lab.attacks.inbox import InboxLab, concurrent
from lab.attacks.inbox_stream import StreamPlan, run_stream
from lab.engine.schedules import ScriptedChooser
from lab.postgres.provision import Postgres
from lab.postgres.workspace import ISOLATION_LEVELS, Workspace

LAB = [sys.executable, "-m", "lab.cli"]
SHOW = "SHOW transaction_isolation"


@pytest.mark.parametrize("level", ISOLATION_LEVELS)
async def test_a_sessions_connection_runs_every_transaction_at_its_level(level: str, workspace: Workspace) -> None:
    """A lone statement (its implicit transaction) and a BEGIN without a level both take the session's level."""
    conn = await workspace.sessions(level)()
    try:
        assert await conn.fetchval(SHOW) == ISOLATION_LEVELS[level]
        async with conn.transaction():
            assert await conn.fetchval(SHOW) == ISOLATION_LEVELS[level]
    finally:
        await conn.close()


async def test_the_labs_own_connections_keep_the_servers_default(workspace: Workspace) -> None:
    """Without a level, and for the provider and the relay, a connection gets whatever the server defaults to."""
    default = await workspace.admin.fetchval("SHOW default_transaction_isolation")
    conn = await workspace.connect()
    try:
        assert await conn.fetchval(SHOW) == default
    finally:
        await conn.close()


async def test_charge_and_inbox_sessions_and_stream_consumers_get_the_level(workspace: Workspace) -> None:
    """Every session a charge attack, an inbox attack or a stream opens reports the level asked for."""
    seen: list[str] = []

    async def charge(db: Any, provider: Any, key: str, body: bytes) -> lab.Response:
        seen.append(await db.fetchval(SHOW))
        return lab.Response(201, {})

    async def consume(db: Any, event: lab.Event) -> None:
        seen.append(await db.fetchval(SHOW))
        async with db.acquire() as conn, conn.transaction():  # and the events are applied, so the stream ends
            await conn.execute("INSERT INTO processed_events VALUES ($1) ON CONFLICT DO NOTHING", event.event_id)

    sessions = workspace.sessions("repeatable-read")
    async with ChargeLab(workspace, lab.at_most_one_provider_call_per_key, connect=sessions) as charge_lab:
        await charge_lab.install(buggy_s3)
        await charge_lab.run(charge, duplicates(2), ScriptedChooser([], strict=False))
    async with InboxLab(workspace, _nothing_wrong, connect=sessions) as inbox:
        await inbox.install(fixed_s4)
        await inbox.run(consume, concurrent(2), ScriptedChooser([], strict=False))
    await run_stream(workspace, consume, _nothing_wrong, StreamPlan(events=20, crash_rate=0.0), sessions=sessions)
    assert len(seen) >= 2 + 2 + 20
    assert set(seen) == {"repeatable read"}


async def test_repeatable_read_refuses_the_lost_update_only_after_both_charged(workspace: Workspace) -> None:
    """Scenario 3 at REPEATABLE READ: T2's overwrite fails with 40001 (its client gets a 500); both charges stay."""
    async with ChargeLab(workspace, buggy_s3.INVARIANT, connect=workspace.sessions("repeatable-read")) as charge_lab:
        await charge_lab.install(buggy_s3)
        outcome = await charge_lab.run(buggy_s3.handle_charge, duplicates(2), buggy_s3.CANONICAL.chooser(strict=True))
    t2 = next(r for r in outcome.results if r.name == "T2")
    assert isinstance(t2.error, asyncpg.SerializationError)
    assert outcome.anomalies == ["key k1 charged 2 times (ch_1, ch_2)"]  # no lost update: T1's ch_1 is kept
    charged = await workspace.admin.fetchval(
        f"SELECT count(*) FROM {workspace.ledger}.provider_calls WHERE outcome = 'charged'"
    )
    assert charged == 2


async def test_read_committed_lets_the_last_update_win(workspace: Workspace) -> None:
    """The same race at READ COMMITTED: T2's UPDATE waits, then overwrites T1's completion; nothing is raised."""
    async with ChargeLab(workspace, buggy_s3.INVARIANT, connect=workspace.sessions("read-committed")) as charge_lab:
        await charge_lab.install(buggy_s3)
        outcome = await charge_lab.run(buggy_s3.handle_charge, duplicates(2), buggy_s3.CANONICAL.chooser(strict=True))
    assert all(r.error is None for r in outcome.results)
    assert outcome.anomalies == [
        "key k1 charged 2 times (ch_1, ch_2)",
        "key k1: T1 was answered 201 ch_1, but the key replays 201 ch_2",
    ]


def test_lab_run_says_the_level_it_runs_at(postgres: Postgres) -> None:
    """`lab run 1 --buggy --explore --isolation serializable` says the level and, the bug reproduced, exits 0."""
    done = _lab("run", "1", "--buggy", "--explore", "--isolation", "serializable", dsn=postgres.dsn)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "isolation: SERIALIZABLE for every session's transactions" in done.stdout
    assert "yes: bug reproduced" in done.stdout


def test_isolation_on_a_scenario_without_transactions_is_one_line_and_exit_2() -> None:
    """Scenario 2's retry loop has no session to put at a level: one line naming the scenarios that do, exit 2."""
    done = _lab("run", "2", "--isolation", "serializable")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("lab: scenario 2 (s2_retry_herd) does not take --isolation (it takes --buggy")
    assert done.stderr.strip().endswith("; scenarios 1, 3, 4 do")


def _lab(*args: str, dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    if dsn is not None:
        env["LAB_DATABASE_URL"] = dsn
    return subprocess.run([*LAB, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


async def _nothing_wrong(workspace: Workspace) -> list[str]:
    return []
