"""The grader behind ``lab check``: the battery a fix is proven with, run against a learner's handler.

The attack and the invariant come from the registry's scenario, never from the learner's file, and
every count is read from the database (the provider's ledger) after the run. On top of the
scenario's invariant the grader holds a charge endpoint to the answers of the IETF Idempotency-Key
draft, because "never charges twice" is also what a handler that never charges does:

* every request is answered (an exception is a 500 the client will retry);
* a key that was sent is charged (someone must win);
* a duplicate that arrives after the winner answered gets the winner's response, byte for byte;
  a duplicate in flight gets 409 or that same response, never a different success;
* the same key with a different body is refused, with 422 once the first request has answered.

A verdict is the first attack that broke a rule and its *smallest* failing run (fewest context
switches), or the list of attacks that held. What makes grading impossible (a handler that raises
on a lone request, hangs, or behaves differently on replay) is a :class:`CannotGrade`, one line.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from lab.bounded import FewestFirst, Found, explore
from lab.charge import ChargeLab, Request, RunOutcome, duplicates, switches
from lab.contracts import Response
from lab.errors import LabError
from lab.invariants import Invariant
from lab.registry import ScenarioInfo
from lab.scheduler import Choice, Chooser, HandlerHung, ScheduleError
from lab.schedules import DepthFirst, Schedule
from lab.search import search
from lab.submission import Submission
from lab.trace import Trace
from lab.workspace import Workspace

Runner = Callable[[Any], Coroutine[Any, Any, "Judged"]]  # one run under the chooser it is given
OTHER_BODY = json.dumps({"amount": 5000, "currency": "usd"}).encode()


class CannotGrade(LabError):
    """The handler could not be put through the battery; the message is the one line to show."""


@dataclass(frozen=True)
class Budget:
    """How hard the grader tries. The defaults keep a passing check of scenario 1 under a few seconds."""

    pairs_limit: int = 2000  # interleavings of 2 requests: enough for every one of any handler seen so far
    other_body_limit: int = 100  # interleavings of a key reused with another body: its rule shows early
    stall_limit: int = 200  # scenario 3: interleavings with a late retry (per provider behaviour)
    triples_limit: int = 300  # interleavings of 3 requests (the lab's fix has 270) before hypothesis takes over
    random_examples: int = 60  # hypothesis schedules per random attack (3 requests past the limit, and 4)
    max_steps: int = 400  # steps in one run: past this the handler is polling, and the run cannot end
    stress: tuple[tuple[int, int], ...] = ((2, 50), (10, 20))  # (requests released together, trials)
    stream_events: int = 300  # scenario 4: events in the stream with duplicates, crashes and republishing


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


# What each kind of broken rule means, in the words the workshop uses.
ADVICE = {
    "charged": "Two requests with one Idempotency-Key both reached the provider, so the customer paid twice."
    " Exactly one request may win the key, and the database must decide it in one atomic step"
    " (a unique key, a lock that is held, a conflict you look at); every other request must not call the provider.",
    "raised": "An exception is a 500 to the client, who will retry. Catch what losing the race raises"
    " and answer 409 (still in flight) or the stored response (completed).",
    "uncharged": "Nobody was charged although nothing crashed: every request was turned away, so the"
    " customer can never pay. The request that wins the key must process it.",
    "replay": "A retry must get the very answer the first request got (the IETF Idempotency-Key draft):"
    " store the response with the key and replay it; 409 only while the first request is in flight.",
    "body": "The same key with a different body is a client bug, not a retry: refuse it with 422, and"
    " never replay the other request's response for it.",
    "status": "A lone request, with nothing racing it, must be charged and answered with a success.",
}


@dataclass
class Judged:
    outcome: RunOutcome
    problems: list[tuple[str, str]]  # (kind, sentence)
    preemptions: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    @property
    def rank(self) -> int | None:
        return min(_RANK[kind] for kind, _ in self.problems) if self.problems else None

    def size(self) -> tuple[int, int, int, int]:
        """What 'smallest' means: the scenario's own invariant first, then fewest preemptions, switches, steps."""
        rank = len(_RANK) if self.rank is None else self.rank
        return rank, self.preemptions, switches(self.outcome.trace), len(self.outcome.trace.rows)


# A run that broke the scenario's invariant is the lesson; one that only answered wrongly comes after it.
_RANK = {"charged": 0, "recovery": 0, "status": 0, "uncharged": 1, "raised": 2, "body": 3, "replay": 3, "malformed": 3}


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


class ChargeGrader:
    """Scenario 1's battery (and any charge endpoint without crash points) against a submission."""

    def __init__(
        self, workspace: Workspace, info: ScenarioInfo, submission: Submission,
        *, step_timeout: float = 2.0, budget: Budget | None = None,
    ) -> None:
        self.workspace = workspace
        self.info = info
        self.submission = submission
        self.step_timeout = step_timeout
        self.budget = budget or Budget()
        scenario = info.module("buggy")
        self.invariant: Invariant = scenario.INVARIANT
        self.canonical: Schedule = scenario.CANONICAL
        self.schema: str = scenario.SCHEMA
        self.handler = submission.per_request()
        self.lab: ChargeLab | None = None
        self.verdict = Verdict()
        self.advice = dict(ADVICE)

    def attacks(self) -> list[Callable[[], Awaitable[bool]]]:
        """The battery in order; each returns False when it broke a rule (and set the verdict)."""
        return [self._alone, self._pairs, self._other_body, self._triples, self._quadruples]

    async def grade(self) -> Verdict:
        with cannot_grade_when_stuck():
            async with ChargeLab(self.workspace, self.invariant, step_timeout=self.step_timeout) as lab:
                self.lab = lab
                with schema_errors(self.submission):
                    await self.workspace.install(self.submission.schema(self.schema))
                for attack in self.attacks():
                    if not await attack():
                        return self.verdict
                await self._stress()
        return self.verdict

    # -- the attacks, in order; each returns False when it failed (and set the verdict) -----------------

    async def _alone(self) -> bool:
        judged = await self._run([Request("T1")], DepthFirst())
        t1 = judged.outcome.results[0]
        if t1.error is not None:
            line = self.submission.where(t1.error)
            raise CannotGrade(
                f"{self.submission.path}{', ' + line if line else ''}: {self.submission.contract} raised"
                f" {type(t1.error).__name__}: {t1.error} on a single request with nothing racing it; fix that first"
            )
        return self._record("one request alone", [judged])

    async def _pairs(self) -> bool:
        canonical = await self._run(duplicates(2), self.canonical.chooser(strict=False))
        self.verdict.attacks.append(Attack("the canonical race", 1, failing=int(canonical.failed)))
        if not await self._explore("2 duplicate requests", duplicates(2), self.budget.pairs_limit):
            return False
        if canonical.failed:  # it replays leniently, so it can fail where no strict interleaving does
            return self._record("the canonical race", [canonical], add=False)
        return True

    async def _other_body(self) -> bool:
        requests = [Request("T1"), Request("T2", body=OTHER_BODY)]
        return await self._explore("2 requests, same key, different body", requests, self.budget.other_body_limit)

    async def _triples(self) -> bool:
        return await self._explore("3 duplicate requests", duplicates(3), self.budget.triples_limit)

    async def _quadruples(self) -> bool:
        return await self._random("4 duplicate requests", duplicates(4))

    async def _explore(self, what: str, requests: list[Request], limit: int) -> bool:
        return await self.explore_runs(what, lambda chooser: self._run(requests, chooser), len(requests), limit)

    async def _random(self, what: str, requests: list[Request]) -> bool:
        return await self.random_runs(what, lambda chooser: self._run(requests, chooser), len(requests))

    async def explore_runs(self, what: str, run: Runner, sessions: int, limit: int) -> bool:
        """Every interleaving, fewest preemptions first, up to ``limit`` runs; past the limit, random schedules.

        A failure of the scenario's invariant stops the search once every run with as few preemptions
        has been tried, since none after it can be simpler; the attack is named for what it covered.
        """
        found = await explore(run, lambda judged: judged.rank, limit=limit)
        failing = [judged for _, judged in found.failing]
        if name := explored(what, found):
            return self._record(name, failing, runs=found.runs)
        if not self._record(f"{what}: the first {found.runs} interleavings", failing, runs=found.runs):
            return False
        return await self.random_runs(what, run, sessions)

    async def random_runs(self, what: str, run: Runner, sessions: int) -> bool:
        found = await search(run, lambda judged: judged.failed, max_sessions=sessions,
                             max_examples=self.budget.random_examples)
        name = f"{what}: random schedules (hypothesis, shrunk)"
        if found.smallest is None:
            self.verdict.attacks.append(Attack(name, found.runs))
            return True
        return self._record(name, [found.smallest], runs=found.runs, failing=1)

    async def _stress(self) -> None:
        assert self.lab is not None
        for concurrency, trials in self.budget.stress:
            try:
                stressed = await self.lab.stress(self.handler, concurrency, trials)
            except TimeoutError as exc:
                raise CannotGrade(
                    f"under stress, {concurrency} requests released together did not all answer within"
                    f" {self.step_timeout * 4:g} s: does the handler wait on something that never comes?"
                ) from exc
            name = f"stress: {concurrency} requests released together"
            self.verdict.attacks.append(Attack(name, stressed.trials, "trials", stressed.failing))
            if stressed.failing:
                problems = [f"{stressed.failing} of {stressed.trials} trials: {stressed.examples[0]}"]
                advice = [
                    self.advice["charged"],
                    "Every scheduled interleaving held, so the race depends on timing the scheduler cannot"
                    " pause: a step outside the db proxy and the provider (a thread, a sleep, another connection)?",
                ]
                failure = Failure(name, stressed.failing, stressed.trials, None, problems, advice, "trials")
                self.verdict.failure = failure
                return

    # -- machinery ---------------------------------------------------------------------------------------

    async def _run(self, requests: list[Request], chooser: Chooser) -> Judged:
        assert self.lab is not None
        outcome = await self.lab.run(self.handler, requests, Guard(chooser, self.budget.max_steps))
        calls = await self.workspace.admin.fetch(
            f"SELECT session, outcome FROM {self.workspace.ledger}.provider_calls ORDER BY call_no"
        )
        problems = [("charged", anomaly) for anomaly in outcome.anomalies]
        answers = judge_answers(requests, outcome, [(c["session"], c["outcome"]) for c in calls])
        # After a double charge, answers that differ are its echo, not news: only an exception is kept.
        problems += [p for p in answers if p[0] == "raised"] if problems else answers
        return Judged(outcome, problems, preemptions_of(chooser, outcome))

    def _record(
        self, name: str, judged: list[Judged], *, runs: int | None = None, failing: int | None = None, add: bool = True
    ) -> bool:
        runs = len(judged) if runs is None else runs
        bad = [j for j in judged if j.failed]
        failing = len(bad) if failing is None else failing
        if add:
            self.verdict.attacks.append(Attack(name, runs, failing=failing))
        if not bad:
            return True
        smallest = min(bad, key=Judged.size)
        kinds = list(dict.fromkeys(kind for kind, _ in smallest.problems))
        problems = [text for _, text in smallest.problems]
        self.verdict.failure = Failure(
            name, failing, runs, smallest.outcome, problems, [self.advice[k] for k in kinds],
            preemptions=preemptions_in(smallest.outcome.trace),
        )
        return False


def judge_answers(
    requests: Sequence[Request], outcome: RunOutcome, calls: Sequence[tuple[str | None, str]]
) -> list[tuple[str, str]]:
    """The draft's answers, checked against what each session got back and what the ledger recorded."""
    problems: list[tuple[str, str]] = []
    results = {r.name: r for r in outcome.results}
    sent = {r.session: r for r in requests}
    for result in outcome.results:
        if result.error is not None and not result.crashed:
            first_line = str(result.error).split("\n", 1)[0]
            problems.append(("raised", f"{result.name} raised {type(result.error).__name__}: {first_line}"))
    responses = {name: r.result for name, r in results.items() if isinstance(r.result, Response)}
    charged = [session for session, what in calls if what == "charged"]
    if len(requests) == 1:
        alone = responses.get(requests[0].session)
        if not charged or alone is None or not 200 <= alone.status < 300:
            said = f"answered {_show(alone)}" if alone else "got no answer"
            times = f"charged {len(charged)} times"
            problems.append(("status", f"a lone request with key {requests[0].key} {said}, {times}"))
        return problems
    if not charged:
        if not any(r.error is not None or r.crashed for r in outcome.results):
            problems.append(("uncharged", f"key {requests[0].key} was never charged: every request was turned away"))
        return problems
    winner = sent.get(charged[0] or "")
    won = responses.get(winner.session) if winner else None
    if winner is None or won is None:
        return problems
    order = outcome.trace.order()
    for request in requests:
        answer = responses.get(request.session)
        if request.session == winner.session or answer is None or request.key != winner.key:
            continue
        got: Response = answer
        after = _started_after(order, request.session, winner.session)
        if request.body == winner.body:
            if after and got != won:
                problems.append((
                    "replay", f"{request.session} came after {winner.session} had answered {_show(won)},"
                    f" so it must get that stored response; it got {_show(got)}",
                ))
            elif 200 <= got.status < 300 and got != won:
                problems.append((
                    "replay", f"{request.session} answered {_show(got)}, but {winner.session}, which charged,"
                    f" answered {_show(won)}: a duplicate gets that stored response, or 409 while it is in flight",
                ))
        elif 200 <= got.status < 300 or (after and got.status != 422):
            problems.append((
                "body", f"{request.session} reused key {request.key} with a different body and got {_show(got)};"
                " it must be refused with 422",
            ))
    return problems


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


def _started_after(order: list[str], later: str, earlier: str) -> bool:
    """``later`` took its first step after ``earlier`` took its last: no overlap at all."""
    firsts = [i for i, who in enumerate(order) if who == later]
    lasts = [i for i, who in enumerate(order) if who == earlier]
    return bool(firsts and lasts) and firsts[0] > lasts[-1]


def _show(response: Response) -> str:
    return f"{response.status} {json.dumps(response.body, sort_keys=True)}"
