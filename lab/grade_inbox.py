"""Scenario 4's battery for ``lab check``: an inbox consumer against the lab's at-least-once relay.

The relay (``lab.inbox``) hands the event over, runs the learner's ``handle_event`` and records the
ack on its own connection; whatever was not acked it delivers again, until it is. The attacks are
those the scenario's fix is proven with: one delivery, the canonical crash, concurrent deliveries in
every interleaving (fewest preemptions first), a crash at every step boundary, random schedules of
deliveries and crashes (hypothesis, shrunk), a stream of events with duplicates, crashes and
republished messages, and malformed events that must be dead-lettered. The only rule is the
scenario's invariant, read from the relay's outbox against ``inventory``: an exception is not a
failure here, since the relay redelivers what was not acked.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from lab.bounded import FewestFirst, explore
from lab.charge import RunOutcome
from lab.contracts import RejectedEvent
from lab.grader import (
    Attack,
    Budget,
    CannotGrade,
    Failure,
    Guard,
    Verdict,
    cannot_grade_when_stuck,
    explored,
    preemptions_in,
    schema_errors,
)
from lab.inbox import Delivery, InboxLab, concurrent
from lab.inbox_stream import StreamPlan, run_stream
from lab.registry import ScenarioInfo
from lab.scheduler import Chooser
from lab.search import search
from lab.submission import Submission
from lab.workspace import Workspace

ADVICE = (
    "The relay delivers at least once: after a crash, or when a consumer is slow, the same event comes"
    " again, even to two consumers at once. Record the event id and apply it in one transaction, and"
    " apply it only if the record is new (INSERT ... ON CONFLICT DO NOTHING RETURNING gave a row); an"
    " event that can never apply (no id, qty <= 0, unknown SKU) raises lab.RejectedEvent."
)
STREAM = StreamPlan()
MALFORMED = StreamPlan(events=100, malformed=12)


class InboxGrader:
    """Scenario 4's battery against a submission; the verdict of the first attack that breaks the invariant."""

    def __init__(
        self, workspace: Workspace, info: ScenarioInfo, submission: Submission,
        *, step_timeout: float = 2.0, budget: Budget | None = None,
    ) -> None:
        self.workspace = workspace
        self.submission = submission
        self.step_timeout = step_timeout
        self.budget = budget or Budget()
        self.scenario: Any = info.module("buggy")
        self.handler = submission.per_request()
        self.lab: InboxLab | None = None
        self.verdict = Verdict()

    async def grade(self) -> Verdict:
        with cannot_grade_when_stuck():
            async with InboxLab(self.workspace, self.scenario.INVARIANT, step_timeout=self.step_timeout) as lab:
                self.lab = lab
                tables = SimpleNamespace(SCHEMA=self.submission.schema(self.scenario.SCHEMA), SEED=self.scenario.SEED)
                with schema_errors(self.submission):
                    await lab.install(tables)
                for attack in (self._alone, self._canonical, self._pairs, self._crashes, self._malformed,
                               self._random_crashes, self._triples, self._stream):
                    if not await attack():
                        break
        return self.verdict

    async def _alone(self) -> bool:
        outcome = await self._run([Delivery("T1")], FewestFirst())
        first = outcome.results[0]
        if first.error is not None and not isinstance(first.error, RejectedEvent):
            line = self.submission.where(first.error)
            raise CannotGrade(
                f"{self.submission.path}{', ' + line if line else ''}: handle_event raised"
                f" {type(first.error).__name__}: {first.error} on a single delivery with nothing racing it;"
                " fix that first"
            )
        return self._record("one delivery alone", _failed([outcome]), 1)

    async def _canonical(self) -> bool:
        chooser = self.scenario.CANONICAL.chooser(strict=False)
        outcome = await self._run([Delivery("T1")], chooser)
        return self._record("the canonical crash: the relay dies before its ack", _failed([outcome]), 1)

    async def _pairs(self) -> bool:
        return await self._explore("2 concurrent deliveries", concurrent(2), self.budget.pairs_limit)

    async def _triples(self) -> bool:
        # Three consumers contending on one row's lock make thousands of interleavings, each slowed by
        # lock waits: random schedules only, where exhaustive search would take minutes.
        return await self._random("3 concurrent deliveries", concurrent(3), crashes=False)

    async def _crashes(self) -> bool:
        assert self.lab is not None
        failing: list[RunOutcome] = []
        swept = await self.lab.crash_everywhere(
            self.handler, observe=lambda outcome: failing.append(outcome) if outcome.anomalies else None
        )
        return self._record("a crash at every step boundary (up to 2 per run), then redelivery", failing,
                            swept.runs)

    async def _random_crashes(self) -> bool:
        return await self._random("2 concurrent deliveries with crashes", concurrent(2), crashes=True)

    async def _random(self, what: str, deliveries: list[Delivery], *, crashes: bool) -> bool:
        found = await search(
            lambda chooser: self._run(deliveries, chooser), lambda outcome: bool(outcome.anomalies),
            max_sessions=len(deliveries), max_examples=self.budget.random_examples, crashes=crashes,
        )
        failing = [found.smallest] if found.smallest is not None else []
        return self._record(f"{what}: random schedules (hypothesis, shrunk)", failing, found.runs)

    async def _explore(self, what: str, deliveries: list[Delivery], limit: int) -> bool:
        found = await explore(lambda chooser: self._run(deliveries, chooser), _rank, limit=limit)
        failing = [outcome for _, outcome in found.failing]
        if name := explored(what, found):
            return self._record(name, failing, found.runs)
        if not self._record(f"{what}: the first {found.runs} interleavings", failing, found.runs):
            return False
        return await self._random(what, deliveries, crashes=False)

    async def _stream(self) -> bool:
        plan = replace(STREAM, events=self.budget.stream_events)
        return await self._flow(f"a stream of {plan.events} events: duplicates, crashes, republished", plan)

    async def _malformed(self) -> bool:
        return await self._flow(f"{MALFORMED.malformed} malformed events in a stream of {MALFORMED.events}", MALFORMED)

    async def _flow(self, name: str, plan: StreamPlan) -> bool:
        streamed = await run_stream(self.workspace, self.handler, self.scenario.INVARIANT, replace(plan, seed=1))
        self.verdict.attacks.append(Attack(name, streamed.messages, "messages", len(streamed.anomalies)))
        if not streamed.anomalies:
            return True
        shown = streamed.anomalies[:5] + ([f"... and {len(streamed.anomalies) - 5} more"]
                                          if len(streamed.anomalies) > 5 else [])
        self.verdict.failure = Failure(name, len(streamed.anomalies), streamed.messages, None, shown, [ADVICE],
                                       unit="messages")
        return False

    async def _run(self, deliveries: list[Delivery], chooser: Chooser) -> RunOutcome:
        assert self.lab is not None
        return await self.lab.run(self.handler, deliveries, Guard(chooser, self.budget.max_steps))

    def _record(self, name: str, failing: list[RunOutcome], runs: int) -> bool:
        self.verdict.attacks.append(Attack(name, runs, failing=len(failing)))
        if not failing:
            return True
        smallest = min(failing, key=lambda o: (preemptions_in(o.trace), len(o.trace.rows)))
        self.verdict.failure = Failure(name, len(failing), runs, smallest, list(smallest.anomalies), [ADVICE],
                                       preemptions=preemptions_in(smallest.trace))
        return False


def _rank(outcome: RunOutcome) -> int | None:
    return 0 if outcome.anomalies else None


def _failed(outcomes: list[RunOutcome]) -> list[RunOutcome]:
    return [outcome for outcome in outcomes if outcome.anomalies]
