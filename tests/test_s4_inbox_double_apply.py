"""Scenario 4: the buggy consumer applies a redelivered event again; the fix applies it once, under every attack.

Every figure below is read from the database (``inventory``, ``processed_events``, the relay's tables),
never from what a handler returned; the stream's truth is recomputed here from the events it published.
"""

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import wrong_fixes.s4_two_transactions as two_transactions
from golden import assert_matches_golden

import fixes.s4_inbox_double_apply as fixed
import lab
import scenarios.s4_inbox_double_apply as buggy
from lab.attacks.charge import RunOutcome
from lab.attacks.inbox import E1, Delivery, InboxLab, InboxScenario, concurrent, crash_points
from lab.attacks.inbox_stream import StreamPlan, StreamResult, run_stream, stream_messages
from lab.engine.schedules import ScriptedChooser
from lab.engine.timeline import plain, render
from lab.postgres.workspace import Workspace

HOLDS = "reserved per SKU is the sum of distinct events' quantities; none lost, none applied twice"


@pytest.fixture
async def inbox(workspace: Workspace) -> AsyncIterator[InboxLab]:
    async with InboxLab(workspace, lab.reserved_is_sum_of_distinct_events) as inbox:
        yield inbox


async def reserved(workspace: Workspace, sku: str = "sku-01") -> int:
    query = f"SELECT reserved FROM {workspace.schema}.inventory WHERE sku = $1"
    value: int = await workspace.admin.fetchval(query, sku)
    return value


async def column(workspace: Workspace, sql: str) -> list[Any]:
    """The first column of a query's rows; ``{s}`` in the query names the scenario's schema."""
    return [row[0] for row in await workspace.admin.fetch(sql.format(s=workspace.schema))]


def lock_waits(outcome: RunOutcome) -> list[tuple[str, str]]:
    return [(row.session, row.text.split(" (")[0]) for row in outcome.trace.rows if row.waiting]


# -- crash-redelivery after commit: the canonical schedule -----------------------------------------------


async def test_canonical_crash_redelivery_applies_the_event_twice(inbox: InboxLab, workspace: Workspace) -> None:
    """When the relay crashes after the consumer's commit and redelivers, the buggy consumer reserves twice."""
    await inbox.install(buggy)
    outcome = await inbox.run(buggy.handle_event, [Delivery("T1")], buggy.CANONICAL.chooser(strict=True))
    assert await reserved(workspace) == 2 * E1.qty
    assert await column(workspace, "SELECT session FROM {s}.relay_deliveries") == ["T1", "T2"]
    assert outcome.anomalies == ["event e1 applied 2 times (sku-01 reserved 10, expected 5)"]
    assert [r.crashed for r in outcome.results] == [True, False]
    assert_matches_golden(
        "s4_inbox_double_apply.buggy.txt", plain(render(outcome.trace, outcome.results, outcome.anomalies, holds=HOLDS))
    )


async def test_fix_under_the_canonical_schedule_applies_once(inbox: InboxLab, workspace: Workspace) -> None:
    """The fix, replayed on the same crash, reserves once: the redelivery's insert returns no row."""
    await inbox.install(fixed)
    outcome = await inbox.run(fixed.handle_event, [Delivery("T1")], buggy.CANONICAL.chooser(strict=False))
    assert await reserved(workspace) == E1.qty
    assert await column(workspace, "SELECT session FROM {s}.relay_acks") == ["T2"]
    assert outcome.anomalies == []
    assert_matches_golden(
        "s4_inbox_double_apply.fixed.txt", plain(render(outcome.trace, outcome.results, outcome.anomalies, holds=HOLDS))
    )


# -- concurrent redelivery: the same event with two consumers at once -----------------------------------

# T1 inserts e1 and keeps its transaction open; T2's insert must wait for T1's commit.
OVERLAP = ["T1", "T1", "T2", "T2", "T1", "T1", "T1", "T2", "T2", "T2"]


@pytest.mark.parametrize(("module", "applied"), [(buggy, 2), (fixed, 1)], ids=["buggy", "fixed"])
async def test_second_delivery_waits_on_the_first_uncommitted_row(
    inbox: InboxLab, workspace: Workspace, module: InboxScenario, applied: int
) -> None:
    """T2's insert of e1 blocks on T1's uncommitted row, shown <waiting ...>, and completes after T1's COMMIT."""
    await inbox.install(module)
    outcome = await inbox.run(module.handle_event, concurrent(2), ScriptedChooser(OVERLAP, strict=False))
    rows = [(r.session, r.text.split(" ")[0], r.waiting) for r in outcome.trace.rows]
    assert rows[:2] == [("T1", "relay.deliver('e1',", False), ("T2", "relay.deliver('e1',", False)]
    assert rows[4:9] == [
        ("T2", "BEGIN", False),
        ("T2", "INSERT", True),
        ("T1", "UPDATE", False),
        ("T1", "COMMIT", False),
        ("T2", "<...", False),
    ]
    assert "<waiting ...>" in plain(render(outcome.trace, outcome.results, outcome.anomalies, holds=HOLDS))
    assert await reserved(workspace) == applied * E1.qty


async def test_concurrent_redelivery_applies_twice_in_every_interleaving(inbox: InboxLab) -> None:
    """Two consumers given e1 at once: the buggy one reserves twice in every interleaving, lock wait or not."""
    await inbox.install(buggy)
    waits: list[list[tuple[str, str]]] = []
    found = await inbox.explore(
        buggy.handle_event, concurrent(2), observe=lambda o: waits.append(lock_waits(o)), reduction=False
    )
    assert found.runs > 50
    assert found.failing == found.runs
    assert found.smallest is not None
    assert found.smallest.anomalies == ["event e1 applied 2 times (sku-01 reserved 10, expected 5)"]
    assert any(w and w[0][1].startswith("INSERT INTO processed_events") for w in waits)


async def test_concurrent_redelivery_is_applied_once_in_every_interleaving(inbox: InboxLab) -> None:
    """Two consumers given e1 at once: the fix reserves exactly once in every interleaving, including the waits."""
    await inbox.install(fixed)
    waits: list[list[tuple[str, str]]] = []
    found = await inbox.explore(
        fixed.handle_event, concurrent(2), observe=lambda o: waits.append(lock_waits(o)), reduction=False
    )
    assert found.runs > 50
    assert found.failing == 0
    assert sum(1 for w in waits if w) > 0


# -- a crash at every step boundary, then redelivery until acknowledged --------------------------------


async def test_a_crash_after_commit_anywhere_in_the_sweep_double_applies(inbox: InboxLab) -> None:
    """Crashing the buggy consumer at every boundary finds the double reservation (crash after COMMIT)."""
    await inbox.install(buggy)
    runs: list[RunOutcome] = []
    swept = await inbox.crash_everywhere(buggy.handle_event, observe=runs.append)
    assert crash_points(runs[0]) == 5  # before BEGIN, INSERT, UPDATE, COMMIT, and the relay's ack
    assert 1 <= swept.failing < swept.runs
    assert swept.smallest is not None
    assert swept.smallest.anomalies == ["event e1 applied 2 times (sku-01 reserved 10, expected 5)"]


async def test_fix_applies_once_wherever_it_crashes(inbox: InboxLab) -> None:
    """With up to two crashes at any step boundaries and redelivery until acked, the fix applies e1 exactly once."""
    await inbox.install(fixed)
    runs: list[RunOutcome] = []
    swept = await inbox.crash_everywhere(fixed.handle_event, observe=runs.append)
    assert crash_points(runs[0]) == 5
    assert swept.runs >= 1 + 5 * 4  # no crash; a crash at each of 5 boundaries, then at each on redelivery
    assert sum(1 for r in runs if any(row.text.startswith("✗ crash") for row in r.trace.rows)) == swept.runs - 1
    assert swept.failing == 0


async def test_the_crash_sweep_rejects_a_fix_split_over_two_transactions(inbox: InboxLab) -> None:
    """Recording in one transaction and applying in another survives a concurrent duplicate, but a crash between
    its commits loses e1."""
    await inbox.install(two_transactions)
    overlapping = await inbox.run(two_transactions.handle_event, concurrent(2), ScriptedChooser(OVERLAP, strict=False))
    assert lock_waits(overlapping) and overlapping.anomalies == []
    swept = await inbox.crash_everywhere(two_transactions.handle_event)
    assert swept.failing >= 1
    assert swept.smallest is not None
    assert swept.smallest.anomalies == ["event e1 lost (sku-01 reserved 0, expected 5)"]
    assert [row.text for row in swept.smallest.trace.rows[3:5]] == [
        "COMMIT", "✗ crash: backend terminated, task cancelled"  # between the two transactions
    ]


# -- a stream: 1,000 events for 20 SKUs, random redeliveries and crashes, 4 consumers in parallel -------


async def expected_per_sku(workspace: Workspace, plan: StreamPlan) -> dict[str, int]:
    """The truth recomputed from the events the stream published, each distinct valid event counted once."""
    skus = await column(workspace, "SELECT sku FROM {s}.inventory ORDER BY sku")
    expected: Counter[str] = Counter(dict.fromkeys(skus, 0))
    for event in set(stream_messages(plan, skus[: plan.skus])):
        if event.event_id and event.qty > 0 and event.sku in expected:
            expected[event.sku] += event.qty
    return dict(expected)


async def reserved_per_sku(workspace: Workspace) -> dict[str, int]:
    rows = await workspace.admin.fetch(f"SELECT sku, reserved FROM {workspace.schema}.inventory")
    return {row["sku"]: row["reserved"] for row in rows}


def assert_attacked(stream: StreamResult) -> None:
    """The stream really redelivered, duplicated and crashed, so its verdict means something."""
    assert stream.messages > stream.plan.events  # some events were published twice
    assert stream.redeliveries > 100 and stream.duplicates > 50
    assert stream.consumer_crashes > 50 and stream.relay_crashes > 10


async def test_stream_buggy_consumer_reserves_a_surplus(inbox: InboxLab, workspace: Workspace) -> None:
    """Through 1,000 events with redeliveries and crashes, the buggy consumer reserves more than was ordered."""
    await inbox.install(buggy)
    plan = StreamPlan()
    stream = await run_stream(workspace, buggy.handle_event, lab.reserved_is_sum_of_distinct_events, plan)
    assert_attacked(stream)
    actual, expected = await reserved_per_sku(workspace), await expected_per_sku(workspace, plan)
    surplus = sum(actual.values()) - sum(expected.values())
    assert surplus > 0
    assert stream.surplus == surplus and stream.lost == 0
    assert stream.anomalies and all("surplus" in a for a in stream.anomalies)


async def test_stream_fixed_consumer_reserves_exactly(inbox: InboxLab, workspace: Workspace) -> None:
    """Through 1,000 events with redeliveries and crashes, 4 real consumers: every SKU equals its distinct events."""
    await inbox.install(fixed)
    plan = StreamPlan()
    stream = await run_stream(workspace, fixed.handle_event, lab.reserved_is_sum_of_distinct_events, plan)
    assert_attacked(stream)
    assert await reserved_per_sku(workspace) == await expected_per_sku(workspace, plan)
    assert await column(workspace, "SELECT count(*) FROM {s}.processed_events") == [plan.events]
    assert sorted(await column(workspace, "SELECT DISTINCT session FROM {s}.relay_deliveries")) == [
        "C1", "C2", "C3", "C4"
    ]
    assert stream.anomalies == []
    assert stream.events_per_s > 0


# -- malformed events: rejected, recorded, never half-applied, and the stream goes on -------------------


async def test_malformed_events_are_dead_lettered_and_never_half_applied(inbox: InboxLab, workspace: Workspace) -> None:
    """Zero or negative qty, an unknown SKU, a missing id: each dead-lettered with its reason, none applied."""
    await inbox.install(fixed)
    plan = StreamPlan(events=200, malformed=12)
    stream = await run_stream(workspace, fixed.handle_event, lab.reserved_is_sum_of_distinct_events, plan)
    assert stream.anomalies == []
    letters = await workspace.admin.fetch(f"SELECT event_id, sku, qty, error FROM {workspace.schema}.dead_letters")
    assert len(letters) == 12
    for letter in letters:
        if letter["sku"] == "sku-unknown":
            assert "unknown sku 'sku-unknown'" in letter["error"]
        else:
            assert "needs an event_id and a positive qty" in letter["error"]
            assert letter["event_id"] == "" or letter["qty"] <= 0
    bad_ids = {letter["event_id"] for letter in letters}
    assert bad_ids & set(await column(workspace, "SELECT event_id FROM {s}.processed_events")) == set()
    assert await reserved_per_sku(workspace) == await expected_per_sku(workspace, plan)  # the stream went on


async def test_an_unknown_sku_rolls_back_the_dedup_record(inbox: InboxLab, workspace: Workspace) -> None:
    """The fix's unknown-SKU rejection rolls its insert back in the same transaction, then the relay dead-letters."""
    await inbox.install(fixed)
    stray = lab.Event("e9", "sku-99", 3)
    outcome = await inbox.run(fixed.handle_event, [Delivery("T1", stray)], ScriptedChooser([], strict=False))
    assert [row.text.split(" ")[0] for row in outcome.trace.rows] == [
        "relay.deliver('e9',", "BEGIN", "INSERT", "UPDATE", "ROLLBACK", "relay.dead_letter('e9',"
    ]
    assert await column(workspace, "SELECT count(*) FROM {s}.processed_events") == [0]
    assert await column(workspace, "SELECT outcome FROM {s}.relay_acks") == ["dead-lettered"]
    assert outcome.anomalies == []


async def test_buggy_consumer_accepts_malformed_events(inbox: InboxLab, workspace: Workspace) -> None:
    """The buggy consumer rejects nothing: malformed events are recorded as processed, some applied."""
    await inbox.install(buggy)
    plan = StreamPlan(events=200, malformed=12, crash_rate=0, duplicate_rate=0, republish_rate=0)
    stream = await run_stream(workspace, buggy.handle_event, lab.reserved_is_sum_of_distinct_events, plan)
    accepted = [a for a in stream.anomalies if a.startswith("malformed")]
    assert len(accepted) == 12
    assert stream.dead_letters == 0
