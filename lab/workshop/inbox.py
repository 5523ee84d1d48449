"""Scenario 4's battery for ``lab check``: an inbox consumer against the lab's at-least-once relay.

The relay (``lab.attacks.inbox``) hands the event over, runs the learner's ``handle_event`` and records the
ack on its own connection; whatever was not acked it delivers again, until it is. The attacks follow
the consumer's contract rule by rule: one event is applied exactly once however it is redelivered
(concurrently in every interleaving, after a crash at every step boundary, in random schedules of
both); two *different* events on one SKU both count, in every interleaving (no lost update); an
event that can never apply is rejected (``lab.RejectedEvent``) and dead-lettered, for every kind of
malformed event on purpose (zero and negative quantity, unknown SKU, empty id, each field missing),
while the smallest valid one is applied; and a stream of events with duplicates, crashes,
republished and malformed messages, four consumers at once. The only judge is the scenario's
invariant, read from the relay's outbox against ``inventory``: an exception is not a failure here,
since the relay redelivers what was not acked.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

from lab.attacks.charge import RunOutcome, identical
from lab.attacks.inbox import E1, Delivery, InboxLab, concurrent
from lab.attacks.inbox_stream import StreamPlan, run_stream
from lab.contracts import Event, RejectedEvent
from lab.engine.exploration import FewestFirst, explore
from lab.engine.scheduler import Chooser
from lab.engine.search import search
from lab.postgres.workspace import Workspace
from lab.registry import ScenarioInfo
from lab.workshop.grading import (
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
from lab.workshop.submission import Submission

RULES = [  # (words an anomaly says, the rule it breaks): the verdict names the rule, then what it asks
    ("applied", "each event is applied exactly once. The relay delivers at least once: after a crash, or when a"
     " consumer is slow, the same event comes again, even to two consumers at once. Record the event id and apply"
     " it in one transaction, and apply it only if the record is new (INSERT ... ON CONFLICT DO NOTHING"
     " RETURNING gave a row)."),
    ("surplus", "each event is applied exactly once. Record the event id and apply it in one transaction, and"
     " apply it only if the record is new (INSERT ... ON CONFLICT DO NOTHING RETURNING gave a row)."),
    ("lost", "no event is lost. Record and apply commit together or not at all, and two different events on one"
     " SKU both count: add to reserved in the UPDATE itself (reserved = reserved + $1), never a value computed"
     " from an earlier read, unless that read locked the row (FOR UPDATE)."),
    ("malformed", "an event that can never apply is rejected. Raise lab.RejectedEvent (the lab's convention:"
     " the relay dead-letters it instead of redelivering it) for no event id or an empty one, a quantity that"
     " is missing, zero or negative, and a SKU that is missing or unknown, and record nothing for it."),
    ("never acknowledged", "every valid event is acknowledged: the consumer returns normally once the event is"
     " applied, or was applied before; an exception makes the relay deliver it again."),
]
STREAM = StreamPlan(malformed=12)
OTHER = Event("e2", "sku-01", 3)  # a second event on E1's SKU
MALFORMED: list[tuple[str, Event]] = [  # every kind, on purpose; a missing field arrives as None
    ("a quantity of 0", Event("bad-zero", "sku-01", 0)),
    ("a negative quantity", Event("bad-negative", "sku-01", -3)),
    ("an unknown SKU", Event("bad-sku", "sku-unknown", 4)),
    ("an empty event id", Event("", "sku-01", 4)),
    ("no event id", Event(cast(str, None), "sku-01", 4)),
    ("no SKU", Event("bad-no-sku", cast(str, None), 4)),
    ("no quantity", Event("bad-no-qty", "sku-01", cast(int, None))),
]
VALID_EDGES = [("a quantity of 1", Event("edge-one", "sku-01", 1))]


def advice_for(anomalies: list[str]) -> list[str]:
    """The rules the anomalies break, each once, in the order of ``RULES``."""
    said = [f"Rule broken: {rule}" for words, rule in RULES if any(words in a for a in anomalies)]
    return list(dict.fromkeys(said)) or [f"Rule broken: {RULES[0][1]}"]


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
                               self._other_event, self._random_crashes, self._triples, self._stream):
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

    async def _other_event(self) -> bool:
        """A lost update needs one preemption: the simplest interleavings find it, no random schedules after."""
        deliveries = [Delivery("T1", E1), Delivery("T2", OTHER)]
        found = await explore(lambda chooser: self._run(deliveries, chooser), _rank, limit=self.budget.other_body_limit,
                              reduction=self.budget.reduction)
        what = "2 different events on one SKU"
        name = explored(what, found) or f"{what}: the {found.runs} simplest interleavings"
        return self._record(name, [outcome for _, outcome in found.failing], found.runs)

    async def _triples(self) -> bool:
        # Three consumers contending on one row's lock make thousands of interleavings, each slowed by
        # lock waits: reduced, they are a few hundred classes; past the limit, random schedules.
        deliveries = [*concurrent(2), Delivery("T3", OTHER)]
        return await self._explore("an event twice and another on its SKU", deliveries, self.budget.triples_limit)

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
        twins = identical([(d.session, d.event) for d in deliveries])
        found = await explore(lambda chooser: self._run(deliveries, chooser), _rank, limit=limit,
                              reduction=self.budget.reduction, twins=twins)
        failing = [outcome for _, outcome in found.failing]
        if name := explored(what, found):
            return self._record(name, failing, found.runs)
        if not self._record(f"{what}: the first {found.runs} interleavings", failing, found.runs):
            return False
        return await self._random(what, deliveries, crashes=False)

    async def _stream(self) -> bool:
        plan = replace(STREAM, events=self.budget.stream_events)
        return await self._flow(f"a stream of {plan.events} events: duplicates, crashes, republished,"
                                f" {plan.malformed} malformed", plan)

    async def _malformed(self) -> bool:
        """One delivery of each kind of malformed event, and of the smallest valid one: the relay does the rest."""
        failing: list[RunOutcome] = []
        for _what, event in [*MALFORMED, *VALID_EDGES]:
            outcome = await self._run([Delivery("T1", event)], FewestFirst())
            if outcome.anomalies:
                failing.append(outcome)
        return self._record(f"{len(MALFORMED)} kinds of malformed event, each alone, and {VALID_EDGES[0][0]}",
                            failing, len(MALFORMED) + len(VALID_EDGES))

    async def _flow(self, name: str, plan: StreamPlan) -> bool:
        streamed = await run_stream(self.workspace, self.handler, self.scenario.INVARIANT, replace(plan, seed=1))
        self.verdict.attacks.append(Attack(name, streamed.messages, "messages", len(streamed.anomalies)))
        if not streamed.anomalies:
            return True
        shown = streamed.anomalies[:5] + ([f"... and {len(streamed.anomalies) - 5} more"]
                                          if len(streamed.anomalies) > 5 else [])
        self.verdict.failure = Failure(name, len(streamed.anomalies), streamed.messages, None, shown,
                                       advice_for(streamed.anomalies), unit="messages")
        return False

    async def _run(self, deliveries: list[Delivery], chooser: Chooser) -> RunOutcome:
        assert self.lab is not None
        return await self.lab.run(self.handler, deliveries, Guard(chooser, self.budget.max_steps))

    def _record(self, name: str, failing: list[RunOutcome], runs: int) -> bool:
        self.verdict.attacks.append(Attack(name, runs, failing=len(failing)))
        if not failing:
            return True
        smallest = min(failing, key=lambda o: (preemptions_in(o.trace), len(o.trace.rows)))
        self.verdict.failure = Failure(name, len(failing), runs, smallest, list(smallest.anomalies),
                                       advice_for(smallest.anomalies), preemptions=preemptions_in(smallest.trace))
        return False


def _rank(outcome: RunOutcome) -> int | None:
    return 0 if outcome.anomalies else None


def _failed(outcomes: list[RunOutcome]) -> list[RunOutcome]:
    return [outcome for outcome in outcomes if outcome.anomalies]
