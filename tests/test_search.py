"""Schedule search: cheapest-first exhaustive exploration, and hypothesis's random schedules, shrunk.

Most tests play a toy scheduler (sessions with a fixed number of steps) so they need no database
and state the search's guarantees exactly; the last ones search real handlers against Postgres.
"""

import itertools
from collections.abc import AsyncIterator

import pytest

import fixes.s1_dedup_race as fixed
import lab
import scenarios.s1_dedup_race as buggy
from lab.attacks.charge import ChargeLab, RunOutcome, duplicates, switches
from lab.engine.exploration import FewestFirst, explore
from lab.engine.scheduler import Chooser, Crash, ScheduleError
from lab.engine.search import SequenceChooser, search
from lab.postgres.workspace import Workspace


def play(chooser: Chooser, steps: dict[str, int]) -> list[str]:
    """A toy scheduler: each session takes its steps; returns who moved, in order."""
    left = dict(steps)
    order: list[str] = []
    while any(left.values()):
        runnable = [name for name in sorted(left) if left[name] > 0]
        choice = chooser.choose(runnable, [])
        assert isinstance(choice, str)
        order.append(choice)
        left[choice] -= 1
    return order


def preemptions(order: list[str], steps: dict[str, int]) -> int:
    """Switches away from a session that still had steps to take."""
    done = dict.fromkeys(steps, 0)
    count = 0
    for a, b in itertools.pairwise(order):
        done[a] += 1
        if a != b and done[a] < steps[a]:
            count += 1
    return count


async def test_every_interleaving_is_run_exactly_once() -> None:
    """Two sessions of two steps have 6 interleavings; cheapest-first runs each of them once."""
    steps = {"T1": 2, "T2": 2}
    seen: list[tuple[str, ...]] = []

    async def run(chooser: FewestFirst) -> list[str]:
        order = play(chooser, steps)
        seen.append(tuple(order))
        return order

    found = await explore(run, lambda _order: None, limit=100)
    assert found.complete and found.runs == 6
    assert sorted(seen) == sorted(set(itertools.permutations(["T1", "T1", "T2", "T2"])))


async def test_interleavings_come_fewest_preemptions_first() -> None:
    """Runs come in nondecreasing preemption order, and the chooser counts preemptions as the toy does."""
    steps = {"T1": 3, "T2": 2, "T3": 1}
    costs: list[int] = []

    async def run(chooser: FewestFirst) -> list[str]:
        order = play(chooser, steps)
        assert chooser.preemptions() == preemptions(order, steps)
        costs.append(chooser.preemptions())
        return order

    found = await explore(run, lambda _order: None, limit=1000)
    assert found.complete and found.runs == 60  # 6! / (3! 2! 1!)
    assert costs == sorted(costs) and costs[0] == 0


async def test_the_first_failure_of_the_worst_kind_stops_the_search_after_its_level() -> None:
    """A failure of rank 0 at k preemptions: every run with k is still tried, none with more."""
    steps = {"T1": 3, "T2": 3}

    async def run(chooser: FewestFirst) -> list[str]:
        return play(chooser, steps)

    def broken(order: list[str]) -> int | None:
        return 0 if order[:2] == ["T1", "T2"] else None  # T1 preempted after its first step

    found = await explore(run, broken, limit=1000)
    assert found.stopped_at == 1 and not found.complete
    assert found.failing and all(cost == 1 for cost, _ in found.failing)
    assert found.runs < 20  # of 20 interleavings in all


async def test_lesser_failures_do_not_stop_the_search() -> None:
    """Failures of a lesser rank are collected, but the search goes on to look for a worse one."""
    steps = {"T1": 2, "T2": 2}

    async def run(chooser: FewestFirst) -> list[str]:
        return play(chooser, steps)

    found = await explore(run, lambda order: 3 if order[0] == "T2" else None, limit=100)
    assert found.complete and found.runs == 6 and len(found.failing) == 3


def test_a_replay_that_diverges_fails_loudly() -> None:
    """A prefix replayed against other runnable sessions than recorded raises ScheduleError."""
    chooser = FewestFirst([1], [["T1", "T2"]])
    with pytest.raises(ScheduleError, match="replay diverged at choice 0"):
        chooser.choose(["T1", "T3"], [])


def test_a_choice_sequence_picks_modulo_then_the_first_session() -> None:
    """Each number picks a runnable session (modulo their count); past the end the first one moves."""
    chooser = SequenceChooser([(3, 0), (0, 0)])
    assert play(chooser, {"T1": 2, "T2": 2}) == ["T2", "T1", "T1", "T2"]


def test_a_choice_sequence_crashes_only_when_asked_and_once_per_session() -> None:
    """With crashes on, a 9 crashes the picked session, never the same session twice; without, 9 means nothing."""
    assert SequenceChooser([(0, 9)]).choose(["T1", "T2"], []) == "T1"
    crashing = SequenceChooser([(0, 9), (0, 9), (1, 9)], crashes=True)
    assert crashing.choose(["T1", "T2"], []) == Crash("T1")
    assert crashing.choose(["T1", "T2"], []) == "T1"
    assert crashing.choose(["T1", "T2"], []) == Crash("T2")


async def test_random_search_shrinks_to_the_smallest_failing_schedule() -> None:
    """Hypothesis finds a schedule where T2 moves before T1 finishes, and shrinks it to one pick: [(1, 0)]."""
    steps = {"T1": 3, "T2": 3}

    async def run(chooser: SequenceChooser) -> list[str]:
        return play(chooser, steps)

    found = await search(run, lambda order: order.index("T2") < 3, max_sessions=2, max_examples=100)
    assert found.choices == [(1, 0)]
    assert found.smallest == ["T2", "T1", "T1", "T1", "T2", "T2"]


async def test_random_search_is_deterministic() -> None:
    """The same seed gives the same runs and the same smallest case, so the grader's output is stable."""
    steps = {"T1": 3, "T2": 2, "T3": 2}

    async def run(chooser: SequenceChooser) -> list[str]:
        return play(chooser, steps)

    def failed(order: list[str]) -> bool:
        return order[-1] == "T1" and order[0] == "T3"

    first = await search(run, failed, max_sessions=3, max_examples=50, seed=7)
    second = await search(run, failed, max_sessions=3, max_examples=50, seed=7)
    assert (first.runs, first.choices, first.smallest) == (second.runs, second.choices, second.smallest)
    assert first.smallest is not None and failed(first.smallest)


async def test_an_error_in_a_run_stops_the_search_and_is_raised() -> None:
    """A run that raises (a hung handler) ends the search at once; the error reaches the caller."""
    calls = 0

    async def run(chooser: SequenceChooser) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise TimeoutError("T2 made no progress")
        return play(chooser, {"T1": 2, "T2": 2})

    with pytest.raises(TimeoutError, match="T2 made no progress"):
        await search(run, lambda _order: False, max_sessions=2, max_examples=100)
    assert calls == 3


# -- against Postgres ----------------------------------------------------------------------------------------


@pytest.fixture
async def charge_lab(workspace: Workspace) -> AsyncIterator[ChargeLab]:
    async with ChargeLab(workspace, lab.at_most_one_provider_call_per_key) as charge_lab:
        yield charge_lab


async def test_random_search_finds_the_double_charge_as_simple_as_exhaustive_search(charge_lab: ChargeLab) -> None:
    """On the buggy handler, the shrunk random schedule has as few switches as the simplest of every interleaving."""
    await charge_lab.install(buggy)
    exhaustive = await charge_lab.explore(buggy.handle_charge, duplicates(2))
    assert exhaustive.smallest is not None
    found = await search(
        lambda chooser: charge_lab.run(buggy.handle_charge, duplicates(2), chooser),
        lambda outcome: bool(outcome.anomalies),
        max_sessions=2,
    )
    assert found.smallest is not None
    assert found.smallest.anomalies == ["key k1 charged 2 times (ch_1, ch_2)"]
    assert switches(found.smallest.trace) == switches(exhaustive.smallest.trace)


async def test_random_search_of_four_requests_finds_nothing_against_the_fix(charge_lab: ChargeLab) -> None:
    """Against the fix, every one of the random 4-request schedules holds."""
    await charge_lab.install(fixed)

    def failed(outcome: RunOutcome) -> bool:
        return bool(outcome.anomalies)

    found = await search(
        lambda chooser: charge_lab.run(fixed.handle_charge, duplicates(4), chooser), failed,
        max_sessions=4, max_examples=30,
    )
    assert found.smallest is None and found.runs == 30
