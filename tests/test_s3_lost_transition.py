"""Scenario 3: the buggy handler charges twice and replays another answer than it gave; the fix never does.

Every fact below is read from the database: the provider's ledger, the key's row, and the answers the lab
recorded on the clients' side of the wire; never from what a handler says about itself. Time is the lab's
clock (``lab.clock``), moved only by the tests, so no test sleeps and every replay is exact.
"""

import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from golden import assert_matches_golden
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sizing import free_sessions

import fixes.s3_lost_transition as fixed
import lab
import scenarios.s3_lost_transition as buggy
from lab.attacks.charge import BODY, ChargeLab, Request, arriving, duplicates
from lab.attacks.provider import Outcome
from lab.engine import clock
from lab.engine.scheduler import Choice, Chooser, Crash
from lab.engine.schedules import ScriptedChooser
from lab.engine.timeline import plain, render
from lab.postgres.provision import Postgres
from lab.postgres.workspace import Workspace

OTHER_BODY = json.dumps({"amount": 5000, "currency": "usd"}).encode()
HOLDS = "the provider is called once per key, and every client answered 2xx got what the key stores"
PAST_THE_LEASE = fixed.LEASE_SECONDS + 1
Handler = Callable[[Any, Any, str, bytes], Awaitable[lab.Response]]


@pytest.fixture
async def charge_lab(workspace: Workspace) -> AsyncIterator[ChargeLab]:
    async with ChargeLab(workspace, fixed.INVARIANT) as charge_lab:
        yield charge_lab


# -- what the database says ------------------------------------------------------------------------


async def calls(workspace: Workspace) -> list[tuple[str, str, str | None]]:
    """The provider's ledger: (session, outcome, idempotency key sent) for every call, in order."""
    rows = await workspace.admin.fetch(
        f"SELECT session, outcome, idempotency_key FROM {workspace.ledger}.provider_calls ORDER BY call_no"
    )
    return [(r["session"], r["outcome"], r["idempotency_key"]) for r in rows]


async def charges(workspace: Workspace) -> int:
    """Money that moved: ledger calls that made a new charge (a deduplicated call is 'replayed')."""
    return sum(1 for _, outcome, _ in await calls(workspace) if outcome == "charged")


async def stored(workspace: Workspace, key: str = "k1") -> tuple[str, lab.Response | None, int] | None:
    """The key's row: its state, the response it replays (when completed), and its attempt."""
    row = await workspace.admin.fetchrow(
        f"SELECT status, response_status, response_body, attempt FROM {workspace.schema}.idempotency_keys"
        " WHERE key = $1",
        key,
    )
    if row is None:
        return None
    response = lab.Response(row["response_status"], json.loads(row["response_body"])) if row["response_body"] else None
    return row["status"], response if row["status"] == "completed" else None, row["attempt"]


async def answers(workspace: Workspace) -> dict[str, lab.Response]:
    """What each client got on the wire, by session, as the lab recorded it."""
    rows = await workspace.admin.fetch(
        f"SELECT session, status, body FROM {workspace.ledger}.client_answers ORDER BY answer_no"
    )
    return {r["session"]: lab.Response(r["status"], json.loads(r["body"])) for r in rows}


def transcript(outcome: Any) -> str:
    return plain(render(outcome.trace, outcome.results, outcome.anomalies, holds=HOLDS))


# -- the canonical schedule ------------------------------------------------------------------------


async def test_canonical_schedule_charges_twice_and_replays_what_t1_was_not_told(
    charge_lab: ChargeLab, workspace: Workspace
) -> None:
    """Under the canonical schedule the retry charges k1 again and its UPDATE overwrites T1's completion."""
    await charge_lab.install(buggy)
    outcome = await charge_lab.run(buggy.handle_charge, duplicates(2), buggy.CANONICAL.chooser(strict=True))
    assert await calls(workspace) == [("T1", "charged", None), ("T2", "charged", None)]
    told = await answers(workspace)
    assert told["T1"] == lab.Response(201, {"charge_id": "ch_1", "amount": 1000})
    assert await stored(workspace) == ("completed", lab.Response(201, {"charge_id": "ch_2", "amount": 1000}), 1)
    assert outcome.anomalies == [
        "key k1 charged 2 times (ch_1, ch_2)",
        "key k1: T1 was answered 201 ch_1, but the key replays 201 ch_2",
    ]
    assert_matches_golden("s3_lost_transition.buggy.txt", transcript(outcome))


async def test_fix_under_the_canonical_schedule_answers_409_and_charges_once(
    charge_lab: ChargeLab, workspace: Workspace
) -> None:
    """The fix on the same schedule: T2 finds a live lease and is told 409 with Retry-After, no provider call."""
    await charge_lab.install(fixed)
    outcome = await charge_lab.run(fixed.handle_charge, duplicates(2), buggy.CANONICAL.chooser(strict=False))
    assert await calls(workspace) == [("T1", "charged", "k1")]
    told = await answers(workspace)
    assert told["T2"] == lab.Response(409, {"error": "a request with this key is in progress", "retry_after": 30})
    assert await stored(workspace) == ("completed", told["T1"], 1)
    assert told["T1"] == lab.Response(201, {"charge_id": "ch_1", "amount": 1000})
    assert outcome.anomalies == []
    assert_matches_golden("s3_lost_transition.fixed.txt", transcript(outcome))


# -- every interleaving ------------------------------------------------------------------------------


async def test_exploration_finds_the_lost_transition_in_k_of_n(charge_lab: ChargeLab) -> None:
    """Depth-first over two buggy sessions finds the double charge in k of n interleavings, 1 <= k < n."""
    await charge_lab.install(buggy)
    found = await charge_lab.explore(buggy.handle_charge, duplicates(2))
    assert 1 <= found.failing < found.runs
    assert found.smallest is not None
    assert "key k1 charged 2 times (ch_1, ch_2)" in found.smallest.anomalies


@pytest.mark.parametrize("sessions", [2, 3])
async def test_fix_holds_in_every_interleaving(charge_lab: ChargeLab, sessions: int) -> None:
    """Across every interleaving of 2 and of 3 duplicates, one provider call and every 201 the stored one."""
    await charge_lab.install(fixed)
    found = await charge_lab.explore(fixed.handle_charge, duplicates(sessions))
    assert found.runs > 1
    assert found.failing == 0


# -- crash points ------------------------------------------------------------------------------------


async def crash_every_boundary(charge_lab: ChargeLab, module: Any) -> Any:
    await charge_lab.install(module)
    return await charge_lab.crash_points(
        module.handle_charge, duplicates(1), [Request("T2")],
        pause=module.CRASH.retry_after, invariant=module.CRASH.invariant,
    )


async def test_crash_after_the_charge_makes_the_buggy_retry_charge_again(charge_lab: ChargeLab) -> None:
    """T1 crashed after its charge: the retry reads in_progress and charges again, with no key for the provider."""
    found = await crash_every_boundary(charge_lab, buggy)
    assert found.runs == 6  # INSERT, BEGIN, SELECT, provider.charge, UPDATE, COMMIT
    assert found.failing == 2  # crashed after the charge, or after the UPDATE that the crash rolled back
    assert found.smallest is not None
    assert found.smallest.anomalies == ["key k1 charged 2 times (ch_1, ch_2)"]


async def test_fix_recovers_from_a_crash_at_every_step_boundary(charge_lab: ChargeLab, workspace: Workspace) -> None:
    """Whichever boundary T1 crashes at, the retry after the lease completes k1 with exactly one charge."""
    found = await crash_every_boundary(charge_lab, fixed)
    assert found.runs == 3  # the claim, provider.charge, the compare-and-set to completed
    assert found.failing == 0
    # The last crash point fell between the charge and the write: the retry's call was deduplicated.
    assert await calls(workspace) == [("T1", "charged", "k1"), ("T2", "replayed", "k1")]
    assert await stored(workspace) == ("completed", (await answers(workspace))["T2"], 2)


# -- stress ------------------------------------------------------------------------------------------


async def test_stress_up_to_200_duplicates_make_one_provider_call(
    charge_lab: ChargeLab, workspace: Workspace, request: pytest.FixtureRequest
) -> None:
    """200 duplicates (or as many as the server has connections free for, see tests/sizing.py) released
    together: one provider call, and every other client told 409 or the replay."""
    await charge_lab.install(fixed)
    sessions = await free_sessions(workspace.dsn, 200, request.node.nodeid)
    stressed = await charge_lab.stress(fixed.handle_charge, concurrency=sessions, trials=3)
    assert (stressed.trials, stressed.failing) == (3, 0)
    assert len(await calls(workspace)) == 1  # of the last trial
    state = await stored(workspace)
    assert state is not None and state[0] == "completed"
    told = list((await answers(workspace)).values())
    assert len(told) == sessions
    assert all(answer == state[1] or answer.status == 409 for answer in told)


async def test_stress_makes_the_buggy_handler_charge_more_than_once(charge_lab: ChargeLab) -> None:
    """Duplicates released together make the buggy handler call the provider more than once in most trials."""
    await charge_lab.install(buggy)
    stressed = await charge_lab.stress(buggy.handle_charge, concurrency=10, trials=20)
    assert stressed.failing >= 18


# -- the four-state machine, transition by transition -------------------------------------------------


@pytest.mark.parametrize(
    ("key", "body", "status"),
    [
        ("", BODY, 400),
        ("k" * 256, BODY, 400),
        ("k1", b"not json", 400),
        ("k1", b"[1000]", 400),
        ("k1", b'{"amount": "1000"}', 400),
        ("k1", b'{"amount": 0}', 400),
        ("k1", b'{"amount": true}', 400),
    ],
)
async def test_malformed_requests_are_400_and_never_reach_the_provider(
    charge_lab: ChargeLab, workspace: Workspace, key: str, body: bytes, status: int
) -> None:
    """A missing, empty or over-255-character key, or a body without a positive integer amount, is a 400."""
    await charge_lab.install(fixed)
    await charge_lab.run(fixed.handle_charge, [Request("T1", key, body)], ScriptedChooser([], strict=False))
    assert (await answers(workspace))["T1"].status == status
    assert await calls(workspace) == []
    assert await stored(workspace, key) is None


async def test_a_255_character_key_is_accepted(charge_lab: ChargeLab, workspace: Workspace) -> None:
    """The longest key the draft allows is charged like any other."""
    await charge_lab.install(fixed)
    key = "k" * 255
    await charge_lab.run(fixed.handle_charge, [Request("T1", key)], ScriptedChooser([], strict=False))
    assert (await answers(workspace))["T1"].status == 201


async def test_same_key_with_another_body_is_422_without_a_provider_call(
    charge_lab: ChargeLab, workspace: Workspace
) -> None:
    """Reusing k1 with a different body is refused with 422, in flight or completed, and nothing is charged."""
    await charge_lab.install(fixed)
    requests = [Request("T1", "k1"), Request("T2", "k1", OTHER_BODY), Request("T3", "k1", OTHER_BODY)]
    turns = ScriptedChooser(["T1", "T2", "T2", "T1", "T1", "T3"], strict=False)  # T2 in flight, T3 after
    await charge_lab.run(fixed.handle_charge, requests, turns)
    told = await answers(workspace)
    assert (told["T2"].status, told["T3"].status) == (422, 422)
    assert await calls(workspace) == [("T1", "charged", "k1")]


async def test_a_completed_key_replays_its_stored_response_exactly(charge_lab: ChargeLab, workspace: Workspace) -> None:
    """A retry after T1 completed gets T1's status and body, byte for byte, and the provider is not called."""
    await charge_lab.install(fixed)
    await charge_lab.run(fixed.handle_charge, duplicates(2), ScriptedChooser(["T1"] * 3, strict=False))
    told = await answers(workspace)
    assert told["T2"] == told["T1"] == lab.Response(201, {"charge_id": "ch_1", "amount": 1000})
    assert len(await calls(workspace)) == 1


async def test_retry_after_counts_down_with_the_lease(charge_lab: ChargeLab, workspace: Workspace) -> None:
    """A retry 12 s into T1's 30 s lease is told to come back in 18 s."""
    await charge_lab.install(fixed)
    turns = ScriptedChooser(["T1", "T1", "T2", "T2", "T2"], strict=False)
    await charge_lab.run(arriving(fixed.handle_charge), duplicates(2), clock.ClockedChooser(turns, {2: 12}))
    assert (await answers(workspace))["T2"].body["retry_after"] == 18


@pytest.mark.parametrize("fault", [Outcome("error", 503), Outcome("timeout"), Outcome("timeout-after-charge")])
async def test_a_failed_key_is_taken_over_by_exactly_one_retry(
    charge_lab: ChargeLab, workspace: Workspace, fault: Outcome
) -> None:
    """After a provider 5xx or timeout the key is failed; of two racing retries one takes it, one is told 409."""
    await charge_lab.install(fixed)
    alone = ScriptedChooser([], strict=False)
    await charge_lab.run(fixed.handle_charge, [Request("T1")], alone, provider_script=[fault])
    assert (await answers(workspace))["T1"].status == 502
    state = await stored(workspace)
    assert state is not None and state[0] == "failed"
    retries = [Request("T2"), Request("T3")]
    await charge_lab.run(fixed.handle_charge, retries, ScriptedChooser(["T2", "T3", "T3"], strict=False), fresh=False)
    told = await answers(workspace)
    assert told["T3"].status == 409
    assert await stored(workspace) == ("completed", told["T2"], 2)
    assert await charges(workspace) == 1  # a charge the timed-out call made is the one the retry gets back


async def test_an_owner_that_lost_its_lease_does_not_overwrite(charge_lab: ChargeLab, workspace: Workspace) -> None:
    """T1 stalls past its lease and T2 takes k1 over; T1's late write changes nothing, both get the same answer."""
    await charge_lab.install(fixed)
    turns = ScriptedChooser(["T1", "T1", "T1", "T2", "T2", "T2", "T2", "T1", "T1"], strict=False)
    chooser = clock.ClockedChooser(turns, {3: PAST_THE_LEASE})  # T1 has charged; T2 arrives after its lease
    await charge_lab.run(arriving(fixed.handle_charge), duplicates(2), chooser)
    told = await answers(workspace)
    assert await stored(workspace) == ("completed", told["T2"], 2)
    assert told["T1"] == told["T2"]
    assert await calls(workspace) == [("T1", "charged", "k1"), ("T2", "replayed", "k1")]


async def test_an_owner_that_lost_its_lease_does_not_mark_the_key_failed(
    charge_lab: ChargeLab, workspace: Workspace
) -> None:
    """T1's provider call times out after T2 took k1 over: T1 is told 409, and T2's claim completes undisturbed."""
    await charge_lab.install(fixed)
    turns = ScriptedChooser(["T1", "T1", "T2", "T2", "T1", "T1", "T1", "T2", "T2"], strict=False)
    chooser = clock.ClockedChooser(turns, {2: PAST_THE_LEASE})  # T1 holds k1 but has not called yet
    timeout = [Outcome("timeout")]  # the first provider call, T1's, never answers
    await charge_lab.run(arriving(fixed.handle_charge), duplicates(2), chooser, provider_script=timeout)
    told = await answers(workspace)
    assert told["T1"].status == 409  # its write of 'failed' missed (attempt 1 no longer holds k1): it replays
    assert await stored(workspace) == ("completed", told["T2"], 2)
    assert await calls(workspace) == [("T1", "timeout", "k1"), ("T2", "charged", "k1")]


# -- the property: any sequence of requests, retries, crashes, expiries and provider failures ---------


@dataclass(frozen=True)
class Send:
    """One client request on its own (a valid one, or a malformed one the fix must refuse)."""

    key: str = "k1"
    body: bytes = BODY
    fault: Outcome | None = None


@dataclass(frozen=True)
class Race:
    """Duplicates of k1 at once, interleaved by ``picks``; the clock may jump past the lease mid-race."""

    sessions: int
    picks: tuple[int, ...]
    expire_at: int | None = None
    fault: Outcome | None = None


@dataclass(frozen=True)
class CrashAt:
    """A request of k1 whose process dies before its (steps+1)-th step."""

    steps: int
    fault: Outcome | None = None


@dataclass(frozen=True)
class Wait:
    """Time passes on the lab clock."""

    seconds: int


Action = Send | Race | CrashAt | Wait

FAULTS = st.sampled_from([None, None, None, Outcome("error", 503), Outcome("timeout"), Outcome("timeout-after-charge")])
ACTIONS: st.SearchStrategy[Action] = st.one_of(
    st.builds(Send, st.sampled_from(["k1", "k1", "k1", "", "k" * 256]), st.sampled_from([BODY, BODY, OTHER_BODY, b"{"]),
              FAULTS),
    st.builds(Race, st.integers(2, 3), st.lists(st.integers(0, 2), max_size=10).map(tuple),
              st.one_of(st.none(), st.integers(0, 6)), FAULTS),
    st.builds(CrashAt, st.integers(0, 3), FAULTS),
    st.builds(Wait, st.sampled_from([10, PAST_THE_LEASE])),
)


class Picks:
    """Plays a list of indices into the runnable sessions; past its end, the first runnable moves."""

    def __init__(self, picks: Sequence[int]) -> None:
        self._picks = iter(picks)

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        return runnable[next(self._picks, 0) % len(runnable)]


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


async def play(charge_lab: ChargeLab, handler: Handler, actions: Sequence[Action]) -> list[str]:
    """Plays the actions on one key from fresh state; returns the first property broken, read from the db.

    After every action: at most one charge for k1; every 2xx answer is the response k1 stores; once k1 is
    completed its row never changes again; a 400 or 422 made no provider call; a race with no provider
    failure and no lease running out made at most one call. At the end, once the lease has run out, a
    clean retry must complete k1, with exactly one charge in all.
    """
    workspace = charge_lab.workspace
    await workspace.reset()
    clock.reset()
    names = (f"T{n}" for n in itertools.count(1))
    sent: list[Request] = []
    completed: tuple[str, lab.Response | None, int] | None = None
    finale: list[Action] = [Wait(PAST_THE_LEASE), Send()]
    for number, action in enumerate([*actions, *finale]):
        if isinstance(action, Wait):
            clock.advance(action.seconds)
            continue
        if number == len(actions) + 1:  # the finale's retry carries the body that claimed k1, if any did
            claimed = await workspace.admin.fetchval(f"SELECT fingerprint FROM {workspace.schema}.idempotency_keys")
            action = Send(body=OTHER_BODY if claimed == fingerprint(OTHER_BODY) else BODY)
        requests, chooser = _requests_and_chooser(action, names)
        sent += requests
        before = len(await calls(workspace))
        fault = [action.fault] if action.fault else None
        late = arriving(handler) if isinstance(action, Race) else handler  # so that a mid-race expiry matters
        await charge_lab.run(late, requests, chooser, provider_script=fault, fresh=False)
        told = await answers(workspace)
        broken = [
            *await lab.at_most_one_charge_per_key(workspace, sent),
            *await lab.answered_as_stored(workspace, sent),
        ]
        made = len(await calls(workspace)) - before
        refused = any(told[r.session].status in (400, 422) for r in requests if r.session in told)
        if refused and made:
            broken.append(f"{action}: a refused request called the provider")
        if isinstance(action, Race) and action.fault is None and action.expire_at is None and made > 1:
            broken.append(f"{action}: {made} provider calls in one race, with no failure and no lease run out")
        state = await stored(workspace)
        if completed is not None and state != completed:
            broken.append(f"{action}: k1 left completed, {completed} became {state}")
        if state is not None and state[0] == "completed":
            completed = state
        if broken:
            return [f"after {number + 1} action(s): {problem}" for problem in broken]
    answer = told[sent[-1].session]
    if answer.status != 201 or await charges(workspace) != 1:
        return [f"a clean retry after the lease was answered {answer.status}, {await charges(workspace)} charge(s)"]
    return []


def _requests_and_chooser(action: Send | Race | CrashAt, names: Iterator[str]) -> tuple[list[Request], Chooser]:
    if isinstance(action, Send):
        return [Request(next(names), action.key, action.body)], ScriptedChooser([], strict=False)
    if isinstance(action, CrashAt):
        name = next(names)
        return [Request(name)], ScriptedChooser([*[name] * action.steps, Crash(name)], strict=False)
    requests = [Request(next(names)) for _ in range(action.sessions)]
    jumps = {} if action.expire_at is None else {action.expire_at: float(PAST_THE_LEASE)}
    return requests, clock.ClockedChooser(Picks(action.picks), jumps)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(ACTIONS, min_size=1, max_size=6))
async def test_fix_keeps_the_state_machine_under_any_sequence(charge_lab: ChargeLab, actions: list[Action]) -> None:
    """Requests, races, crashes, expiries and provider failures in any order: one charge, replays unchanged."""
    await charge_lab.install(fixed)
    assert await play(charge_lab, fixed.handle_charge, actions) == []


@pytest.mark.parametrize(
    "actions",
    [
        [Race(2, (0, 0, 0, 1, 1, 1, 1))],  # each arrives, T1 inserts and begins, T2 reads in_progress
        [CrashAt(4), Wait(PAST_THE_LEASE), Send()],
        [Send(fault=Outcome("timeout-after-charge"))],
    ],
    ids=["race", "crash-after-charge", "lost-response"],
)
async def test_the_property_catches_the_buggy_handler(charge_lab: ChargeLab, actions: list[Action]) -> None:
    """The same property, played on the buggy handler, reports a second charge."""
    await charge_lab.install(buggy)
    broken = await play(charge_lab, buggy.handle_charge, actions)
    assert any("charged 2 times" in problem for problem in broken), broken


# -- the command -------------------------------------------------------------------------------------


def lab_command(postgres: Postgres, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn}
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_lab_run_3_crash_exits_0_with_the_crash_points_row(postgres: Postgres) -> None:
    """`lab run 3 --crash` plays only the crash points, buggy then fixed, and exits 0: reproduced, then held."""
    done = lab_command(postgres, "run", "3", "--crash")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "anomaly in 2 of 6" in done.stdout and "anomaly in 0 of 3" in done.stdout


def test_crash_points_of_a_scenario_without_them_is_one_line_and_exit_2(postgres: Postgres) -> None:
    """Asking scenario 1 for crash points alone is one clear line and exit code 2, not an empty verdict."""
    done = lab_command(postgres, "run", "1", "--crash")
    assert done.returncode == 2
    assert "scenario 1 (s1_dedup_race) does not take --crash" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
