"""Scenario 3's battery for ``lab check``: scenario 1's, plus crash points, provider faults and malformed requests.

A charge endpoint with four states (absent, in_progress, completed, failed) must also survive its
owner dying: the original request crashes at each of its step boundaries and its client retries
after the scenario's pause on the lab clock (``lab.charge.ChargeLab.crash_points``); the provider
fails (503), never answers, or charges and loses its answer, and the client retries at once; and
requests the IETF draft calls malformed (no key, a key over 255 characters, a body without a
positive integer amount) are refused with 400 before anything is stored or charged. The invariants
are the scenario's: ``INVARIANT`` for races, ``CRASH.invariant`` after a crash or a fault.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from lab import clock
from lab.charge import BODY, Request, RunOutcome, arriving, duplicates
from lab.grader import Attack, ChargeGrader, Failure, Guard, Judged, preemptions_of
from lab.provider import Outcome
from lab.scheduler import Choice, Chooser
from lab.schedules import ScriptedChooser
from lab.trace import Row, Trace

FAULTS = {
    "503": Outcome("error", 503),
    "a timeout": Outcome("timeout"),
    "a charge whose answer was lost": Outcome("timeout-after-charge"),
}
MALFORMED = [
    ("no key", "", BODY),
    ("a 256-character key", "k" * 256, BODY),
    ("a body that is not JSON", "k1", b"not json"),
    ("a JSON array", "k1", b"[1000]"),
    ("an amount that is a string", "k1", json.dumps({"amount": "1000"}).encode()),
    ("an amount of 0", "k1", json.dumps({"amount": 0}).encode()),
    ("an amount that is a boolean", "k1", json.dumps({"amount": True}).encode()),
]

ADVICE = {
    "charged": "A retry that finds the key in progress must not call the provider: while the owner's lease"
    " is live it answers 409 with Retry-After. Every transition (claim, completed, failed) is one"
    " compare-and-set that checks its row count and the owner's attempt, so a late owner cannot"
    " overwrite a retry's result; the key goes to the provider too (idempotency_key=key), so a charge"
    " a crashed owner made is not made again.",
    "recovery": "After a crash or a provider failure the client retries with the same key, and that retry"
    " must finish the job exactly once: a failed key (or an expired lease) is taken over by one retry,"
    " and the provider, given the key, returns the charge it already made instead of a new one.",
    "malformed": "The IETF draft answers a missing or malformed Idempotency-Key (empty, over 255"
    " characters) and a request it cannot process with 400, before anything is stored or charged.",
}


class _LateArrival:
    """Moves the lab clock forward just before ``session`` takes its first step: it arrives late."""

    def __init__(self, inner: Chooser, session: str, seconds: float) -> None:
        self.inner, self.session, self.seconds, self.arrived = inner, session, seconds, False

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        choice = self.inner.choose(runnable, blocked)
        if choice == self.session and not self.arrived:
            self.arrived = True
            clock.advance(self.seconds)
        return choice


class LostTransitionGrader(ChargeGrader):
    """Scenario 3: the charge battery with crash points, provider faults and malformed requests."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash = self.info.module("buggy").CRASH
        self.advice.update(ADVICE)

    def attacks(self) -> list[Callable[[], Awaitable[bool]]]:
        # The lesson first (the race, then the owner's crash), the draft's edge cases after it.
        return [self._alone, self._pairs, self._crashes, self._faults, self._stalled, self._other_body,
                self._malformed, self._triples, self._quadruples]

    async def _stalled(self) -> bool:
        """T2 arrives when T1's lease has run out: T1 stalled at each point of its run, and goes on later.

        Twice: with a provider that answers, and with one whose first call never does, so an owner
        that lost its lease and then fails must not mark failed a key its successor holds.
        """
        assert self.lab is not None
        pause = float(self.crash.retry_after)
        arrives_late = arriving(self.handler)
        requests = duplicates(2)
        for fault, how in ((None, ""), (FAULTS["a timeout"], ", the first provider call timing out")):
            script = [fault] if fault else None

            async def run(chooser: Chooser, script: list[Outcome] | None = script) -> Judged:
                assert self.lab is not None
                late = Guard(_LateArrival(chooser, "T2", pause), self.budget.max_steps)
                raced = await self.lab.run(arrives_late, requests, late, provider_script=script)
                # Before anyone retries: the provider's call that failed made no charge, so a key marked
                # failed while a charge exists was written by an owner whose claim had been taken over.
                overwritten = await self._failed_yet_charged() if script else []
                clock.advance(pause)  # whoever was turned away or failed comes back once more, later
                again = await self.lab.run(self.handler, [Request("T3")], ScriptedChooser([], strict=False),
                                           fresh=False)
                row = Row("T3", f"({pause:g} s later on the lab clock, a client retries once more)")
                outcome = RunOutcome(Trace([*raced.trace.rows, row, *again.trace.rows]),
                                     [*raced.results, *again.results], [])
                anomalies = overwritten + await self.crash.invariant(self.workspace, [*requests, Request("T3")])
                outcome.anomalies = anomalies
                return Judged(outcome, [("recovery", a) for a in anomalies], preemptions_of(chooser, outcome))

            if not await self.explore_runs(f"2 duplicate requests, T2 {pause:g} s late{how}", run, 2,
                                           self.budget.stall_limit):
                return False
        return True

    async def _crashes(self) -> bool:
        assert self.lab is not None
        found = await self.lab.crash_points(
            self.handler, duplicates(1), [Request("T2")], pause=self.crash.retry_after,
            invariant=self.crash.invariant,
        )
        name = f"T1 crashed at each step boundary, its client retrying {self.crash.retry_after:g} s later"
        failing = [Judged(found.smallest, [("recovery", a) for a in found.smallest.anomalies])] \
            if found.smallest is not None else []
        return self._record(name, failing, runs=found.runs, failing=found.failing)

    async def _failed_yet_charged(self) -> list[str]:
        ws = self.workspace
        status = await ws.admin.fetchval(f"SELECT status FROM {ws.schema}.idempotency_keys WHERE key = 'k1'")
        charged = await ws.admin.fetchval(
            f"SELECT string_agg(charge_id, ', ') FROM {ws.ledger}.provider_calls WHERE outcome = 'charged'"
        )
        if status == "failed" and charged:
            return [f"key k1 was marked failed while its charge ({charged}) went through: an owner whose lease had"
                    " run out wrote over the claim of the retry that took the key over"]
        return []

    async def _faults(self) -> bool:
        assert self.lab is not None
        judged: list[Judged] = []
        for what, fault in FAULTS.items():
            alone = ScriptedChooser([], strict=False)
            first = await self.lab.run(self.handler, [Request("T1")], alone, provider_script=[fault])
            retry = await self.lab.run(self.handler, [Request("T2")], ScriptedChooser([], strict=False), fresh=False)
            anomalies = await self.crash.invariant(self.workspace, [Request("T1"), Request("T2")])
            later = Row("T2", f"(the provider answered T1 with {what}; its client retries at once)")
            outcome = RunOutcome(Trace([*first.trace.rows, later, *retry.trace.rows]),
                                 [*first.results, *retry.results], anomalies)
            judged.append(Judged(outcome, [("recovery", a) for a in anomalies]))
        return self._record("the provider fails (503, a timeout, a lost answer), then the client retries", judged)

    async def _malformed(self) -> bool:
        assert self.lab is not None
        problems: list[str] = []
        for what, key, body in MALFORMED:
            outcome = await self.lab.run(self.handler, [Request("T1", key, body)], ScriptedChooser([], strict=False))
            calls = await self.workspace.admin.fetchval(f"SELECT count(*) FROM {self.workspace.ledger}.provider_calls")
            answer = outcome.results[0]
            got = (f"raised {type(answer.error).__name__}" if answer.error is not None
                   else f"answered {getattr(answer.result, 'status', answer.result)}")
            if answer.error is not None or getattr(answer.result, "status", None) != 400 or calls:
                problems.append(f"{what}: {got}" + (f", and the provider was called {calls} times" if calls else "")
                                + "; it must be 400, with no provider call")
        name = f"malformed requests: {len(MALFORMED)} kinds, each alone"
        self.verdict.attacks.append(Attack(name, len(MALFORMED), failing=len(problems)))
        if problems:
            self.verdict.failure = Failure(name, len(problems), len(MALFORMED), None, problems,
                                           [self.advice["malformed"]])
            return False
        return True
