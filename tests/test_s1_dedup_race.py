"""Scenario 1: the buggy handler charges twice under the race; the fix never does, under any schedule.

Every count below is read from the provider's ledger in the database, never from a handler's answer.
"""

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest
from golden import assert_matches_golden
from sizing import FEWEST, free_sessions

import fixes.s1_dedup_race as fixed
import lab
import scenarios.s1_dedup_race as buggy
from lab.attacks.charge import ChargeLab, duplicates
from lab.engine.schedules import ScriptedChooser
from lab.engine.timeline import plain, render
from lab.postgres.workspace import Workspace


@pytest.fixture
async def charge_lab(workspace: Workspace) -> AsyncIterator[ChargeLab]:
    async with ChargeLab(workspace, lab.at_most_one_provider_call_per_key) as charge_lab:
        yield charge_lab


async def provider_calls_for(workspace: Workspace, key: str) -> int:
    calls: int = await workspace.admin.fetchval(
        f"SELECT count(*) FROM {workspace.ledger}.provider_calls WHERE reference = $1", key
    )
    return calls


async def test_canonical_race_charges_the_key_twice(charge_lab: ChargeLab, workspace: Workspace) -> None:
    """Under the canonical schedule the buggy handler calls the provider twice for key k1."""
    await charge_lab.install(buggy)
    outcome = await charge_lab.run(buggy.handle_charge, duplicates(2), buggy.CANONICAL.chooser(strict=True))
    assert await provider_calls_for(workspace, "k1") == 2
    assert outcome.anomalies == ["key k1 charged 2 times (ch_1, ch_2)"]
    holds = "a key is processed once"
    transcript = plain(render(outcome.trace, outcome.results, outcome.anomalies, holds=holds))
    assert_matches_golden("s1_dedup_race.buggy.txt", transcript)


async def test_fix_under_the_canonical_schedule_charges_once(charge_lab: ChargeLab, workspace: Workspace) -> None:
    """The fix, replayed on the same schedule, calls the provider once and the loser answers 409."""
    await charge_lab.install(fixed)
    outcome = await charge_lab.run(fixed.handle_charge, duplicates(2), buggy.CANONICAL.chooser(strict=False))
    assert await provider_calls_for(workspace, "k1") == 1
    assert outcome.anomalies == []
    assert outcome.responses()["T2"] == lab.Response(409, {"error": "a request with this key is in progress"})
    holds = "a key is processed once"
    transcript = plain(render(outcome.trace, outcome.results, outcome.anomalies, holds=holds))
    assert_matches_golden("s1_dedup_race.fixed.txt", transcript)


async def test_exploration_finds_the_anomaly_and_counts_interleavings(charge_lab: ChargeLab) -> None:
    """Depth-first exploration of two buggy sessions finds the double charge in k of n interleavings, 1 <= k < n."""
    await charge_lab.install(buggy)
    found = await charge_lab.explore(buggy.handle_charge, duplicates(2))
    assert 1 <= found.failing < found.runs
    assert found.smallest is not None
    assert found.smallest.anomalies == ["key k1 charged 2 times (ch_1, ch_2)"]


@pytest.mark.parametrize("sessions", [2, 3])
async def test_fix_holds_in_every_interleaving(charge_lab: ChargeLab, sessions: int) -> None:
    """Across every interleaving of 2 and of 3 duplicate requests, the fix calls the provider at most once."""
    await charge_lab.install(fixed)
    found = await charge_lab.explore(fixed.handle_charge, duplicates(sessions))
    assert found.runs > 1
    assert found.failing == 0


@pytest.mark.parametrize("concurrency", [2, 10])
async def test_stress_reproduces_the_bug_nearly_always(charge_lab: ChargeLab, concurrency: int) -> None:
    """Released together by a barrier, duplicate requests double-charge in at least 90 of 100 trials."""
    await charge_lab.install(buggy)
    stressed = await charge_lab.stress(buggy.handle_charge, concurrency, trials=100)
    assert stressed.trials == 100
    assert stressed.failing >= 90


@pytest.mark.parametrize(("concurrency", "trials"), [(2, 100), (10, 100), (100, 20)])
async def test_fix_holds_under_stress(
    charge_lab: ChargeLab, workspace: Workspace, request: pytest.FixtureRequest, concurrency: int, trials: int
) -> None:
    """Released together by a barrier, duplicate requests never make the fix call the provider twice.

    100 sessions are as many as the server has connections free for, up to 100 (see tests/sizing.py).
    """
    await charge_lab.install(fixed)
    if concurrency > FEWEST:
        concurrency = await free_sessions(workspace.dsn, concurrency, request.node.nodeid)
    stressed = await charge_lab.stress(fixed.handle_charge, concurrency, trials=trials)
    assert stressed.trials == trials
    assert stressed.failing == 0


async def test_a_stress_run_cancelled_mid_trial_leaves_no_unread_exception(charge_lab: ChargeLab) -> None:
    """Ctrl-C in the middle of a stress trial cancels it without a "never retrieved" traceback after the one line."""
    in_flight = asyncio.Event()

    async def stalls(db: Any, provider: Any, key: str, body: bytes) -> lab.Response:
        in_flight.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        stress = asyncio.create_task(charge_lab.stress(stalls, 2, trials=1))
        await in_flight.wait()
        stress.cancel()
        await asyncio.gather(stress, return_exceptions=True)
        del stress
        await asyncio.sleep(0)  # the loop lets go of the last callback's references
        gc.collect()  # an unread exception is reported when its future is collected
    finally:
        loop.set_exception_handler(previous)
    assert [context["message"] for context in reported] == []


async def test_loser_gets_409_while_the_winner_is_in_flight(charge_lab: ChargeLab) -> None:
    """The request that loses the insert, arriving before the winner has charged, is told 409."""
    await charge_lab.install(fixed)
    chooser = ScriptedChooser(["T1", "T2", "T2", "T1", "T1"], strict=True)
    outcome = await charge_lab.run(fixed.handle_charge, duplicates(2), chooser)
    responses = outcome.responses()
    assert responses["T2"] is not None and responses["T2"].status == 409
    assert responses["T1"] is not None and responses["T1"].status == 201


async def test_loser_replays_the_stored_response_once_completed(charge_lab: ChargeLab) -> None:
    """A duplicate that arrives after the winner completed gets the winner's response, byte for byte."""
    await charge_lab.install(fixed)
    chooser = ScriptedChooser(["T1", "T1", "T1", "T2", "T2"], strict=True)
    outcome = await charge_lab.run(fixed.handle_charge, duplicates(2), chooser)
    responses = outcome.responses()
    assert responses["T1"] == lab.Response(201, {"charge_id": "ch_1", "amount": 1000})
    assert responses["T2"] == responses["T1"]
    assert outcome.anomalies == []


async def test_same_key_with_a_different_body_is_422(charge_lab: ChargeLab) -> None:
    """Reusing a key with another body is refused with 422 and no second provider call."""
    from lab.attacks.charge import Request

    await charge_lab.install(fixed)
    requests = [Request("T1", "k1"), Request("T2", "k1", b'{"amount": 5000, "currency": "usd"}')]
    outcome = await charge_lab.run(fixed.handle_charge, requests, ScriptedChooser(["T1"] * 3 + ["T2"] * 2, strict=True))
    responses = outcome.responses()
    assert responses["T2"] is not None and responses["T2"].status == 422
    assert outcome.anomalies == []
