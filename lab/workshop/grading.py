"""What every grader shares: the verdict it builds, its budget, and the ways a run cannot be graded.

A verdict is a list of attacks that held and at most one :class:`Failure`, the first attack that broke a
rule with its smallest failing run. What makes grading impossible (a handler that hangs, polls, or
behaves differently on replay, a SCHEMA that does not install) is a :class:`CannotGrade`, one line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from lab.attacks.charge import RunOutcome
from lab.engine.exploration import FewestFirst, Found
from lab.engine.scheduler import Choice, Chooser, HandlerHung, ScheduleError
from lab.engine.trace import Trace
from lab.errors import LabError
from lab.workshop.submission import Submission


class CannotGrade(LabError):
    """The handler could not be put through the battery; the message is the one line to show."""


@dataclass(frozen=True)
class Budget:
    """How hard the grader tries. The defaults keep a passing check of scenario 1 under a few seconds."""

    pairs_limit: int = 2000  # interleavings of 2 requests: enough for every one of any handler seen so far
    other_body_limit: int = 100  # interleavings of a key reused with another body: its rule shows early
    stall_limit: int = 200  # scenario 3: interleavings with a late retry (per provider behaviour)
    keys_limit: int = 8  # interleavings of 2 requests with different keys: one preemption shows a key mix-up
    race_limit: int = 20  # interleavings of 2 retries racing for a key in one state (scenario 3), no random after
    triples_limit: int = 300  # reduced interleavings of 3 requests (the lab's fixes: 11) before hypothesis takes over
    quadruples_limit: int = 300  # reduced interleavings of 4 requests (the lab's fixes: about 50), then hypothesis
    random_examples: int = 60  # hypothesis schedules per random attack (past an exhaustive limit)
    max_steps: int = 400  # steps in one run: past this the handler is polling, and the run cannot end
    stress: tuple[tuple[int, int], ...] = ((2, 50), (10, 20))  # (requests released together, trials)
    stream_events: int = 300  # scenario 4: events in the stream with duplicates, crashes and republishing
    reduction: bool = True  # one interleaving per class of equivalent ones (lab.engine.reduction)


@dataclass
class Attack:
    """One line of the summary: what was tried, how many runs, how many broke a rule."""

    name: str
    runs: int
    unit: str = "runs"
    failing: int = 0


@dataclass
class Failure:
    """The first attack that broke a rule, and its smallest failing run."""

    attack: str
    failing: int
    runs: int
    outcome: RunOutcome | None
    problems: list[str]
    advice: list[str]
    unit: str = "runs"
    preemptions: int | None = None  # of the run shown


@dataclass
class Verdict:
    attacks: list[Attack] = field(default_factory=list)
    failure: Failure | None = None

    def tried(self) -> str:
        """'466 runs and 70 trials': how much was tried, by unit."""
        totals: dict[str, int] = {}
        for attack in self.attacks:
            totals[attack.unit] = totals.get(attack.unit, 0) + attack.runs
        return " and ".join(f"{count} {unit}" for unit, count in totals.items())


@contextmanager
def cannot_grade_when_stuck() -> Iterator[None]:
    """A hung handler or a replay that diverged: what the scheduler raises, said as one line."""
    try:
        yield
    except HandlerHung as exc:
        raise CannotGrade(
            f"{exc}: the handler is waiting on something the lab cannot see (an asyncio.Lock, a sleep, an"
            " event?) or on a lock nobody will release; requests run on different servers, so only the"
            " database can make one wait for another"
        ) from exc
    except ScheduleError as exc:
        raise CannotGrade(f"{exc}; the grader replays every run from the same database state") from exc


@contextmanager
def schema_errors(submission: Submission) -> Iterator[None]:
    try:
        yield
    except asyncpg.PostgresError as exc:
        raise CannotGrade(f"{submission.path}: its SCHEMA does not install: {exc}") from exc


class Guard:
    """Counts a run's steps: a handler that polls for another session never ends under a schedule."""

    def __init__(self, inner: Chooser, limit: int) -> None:
        self.inner, self.limit, self.steps = inner, limit, 0

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        self.steps += 1
        if self.steps > self.limit:
            raise CannotGrade(
                f"one run took more than {self.limit} steps: is a request polling in a loop until another"
                " finishes? Under the lab's schedules a request can only wait on a database lock"
            )
        return self.inner.choose(runnable, blocked)


def explored(what: str, found: Found[Any]) -> str | None:
    """The attack's name for what an exploration covered; None if it ran out of budget first."""
    if found.complete:
        return f"every interleaving of {what}"
    if found.stopped_at is None:
        return None
    most = {0: "no preemption", 1: "at most 1 preemption"}.get(found.stopped_at)
    return f"every interleaving of {what} with {most or f'at most {found.stopped_at} preemptions'}"


def preemptions_of(chooser: Chooser, outcome: RunOutcome) -> int:
    """Counted by the chooser that made them where it can, else read from the trace."""
    return chooser.preemptions() if isinstance(chooser, FewestFirst) else preemptions_in(outcome.trace)


def preemptions_in(trace: Trace) -> int:
    """Switches away from a session that was not waiting on a lock and had more steps to take."""
    rows = trace.rows
    return sum(
        1 for i in range(len(rows) - 1)
        if rows[i].session != rows[i + 1].session and not rows[i].waiting
        and any(later.session == rows[i].session for later in rows[i + 2:])
    )
