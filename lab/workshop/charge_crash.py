"""Scenario 3's battery for ``lab check``: scenario 1's, in every state of a four-state key, with its client's retries.

A key here is absent, in flight under a live lease, in flight past its lease, failed, or completed.
Scenario 1's attacks meet the states a race passes through (absent, in flight, completed); this one
adds the rest, each met by a duplicate, by another body and by retries racing each other:

* past its lease: T1 stalls at each of its steps while duplicates arrive as late as the Retry-After
  T1's key announced (the handler's own lease, never a fixed figure): one takes the key over, T1
  comes back to find it taken, and still exactly one charge; another body arriving then gets 422;
* failed: the provider fails (503, no answer, a charge whose answer was lost); the client's retry
  takes the key over and finishes, another body gets 422, two retries racing take it over once;
* an owner that died: T1 crashes at each step boundary (its open transaction rolls back, a charge it
  made stays made) and its client retries as a client does: at once, then after each 409's Retry-After;
* malformed requests get 400 before anything is stored or charged, and the valid edges (a 255- and a
  1-character key, an amount of 1) are charged.

The client's convention, said in the verdict that needs it: a 409 carries ``retry_after`` (seconds) in
its body, the lab's stand-in for the Retry-After header; the client waits that long on the lab clock
(``lab.clock.now()``, which only the lab moves) and retries, up to 3 times; a 409 without it makes the
client wait a minute, then two, then four. The invariants are the scenario's: ``INVARIANT`` for races,
``CRASH.invariant`` (one charge, the key completed, every success what the key replays) after a crash,
a fault or a late retry.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lab.attacks.charge import (
    BODY,
    OTHER_BODIES,
    CrashAfter,
    Paused,
    Request,
    RunOutcome,
    arriving,
    duplicates,
)
from lab.attacks.provider import Outcome
from lab.contracts import ProviderError, Response
from lab.engine import clock
from lab.engine.scheduler import Choice, Chooser, SessionResult
from lab.engine.schedules import ScriptedChooser
from lab.engine.trace import Row, Trace
from lab.workshop.charge import ChargeGrader, Judged
from lab.workshop.grading import Attack, Failure, Guard, preemptions_of

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
    ("a negative amount", "k1", json.dumps({"amount": -1000}).encode()),
    ("an amount that is a boolean", "k1", json.dumps({"amount": True}).encode()),
]
VALID_EDGES = [
    ("a 255-character key", "k" * 255, BODY),
    ("a 1-character key", "k", BODY),
    ("an amount of 1", "k1", json.dumps({"amount": 1, "currency": "usd"}).encode()),
]
DEFAULT_WAIT_S = 60.0  # a 409 that does not say when: the client waits a minute, then doubles
MAX_WAITS = 3  # a client follows this many 409s, then gives up

RULES = {
    "charged": ("one provider call per key while its owner holds it", "A retry that finds the key in progress"
                " must not call the provider: while the owner's lease is live it answers 409 with Retry-After."
                " Every transition (claim, completed, failed) is one compare-and-set that checks its row count and"
                " the owner's attempt, so a late owner cannot overwrite a retry's result; the key goes to the"
                " provider too (idempotency_key=key), so a charge a crashed owner made is not made again."),
    "stored": ("every success is what the key replays", "A client answered 2xx must have been told exactly what"
               " the key stores for replay: write the response with the transition that completes the key, and"
               " answer from it (or from the row) only once that write counted (UPDATE 1)."),
    "recovery": ("after a crash or a failure, the client's retry finishes the job", "After a crash or a provider"
                 " failure the client retries with the same key, and that retry must finish the job exactly once:"
                 " a failed key (or an expired lease) is taken over by one retry, and the provider, given the key,"
                 " returns the charge it already made instead of a new one. Leases run on the lab's clock: read"
                 " the time with lab.clock.now(), never the wall clock or the database's now(), which the lab"
                 " cannot move."),
    "takeover": ("one retry takes a key over", "When several retries find a key failed, or its lease run out,"
                 " exactly one may take it over (one atomic compare-and-set that checks its row count); the"
                 " others answer 409 or the stored response, and never call the provider."),
    "retry_after": ("Retry-After is a promise", "A 409 says when to retry: body {'retry_after': seconds} is the"
                    " lab's stand-in for the Retry-After header. The lab's client waits exactly that long on the"
                    " lab clock (lab.clock.now(), which only the lab moves) and retries; once the key's owner is"
                    " gone its lease must have run out by then, so the retry takes the key over."),
    "malformed": ("malformed requests get 400", "The IETF draft answers a missing or malformed Idempotency-Key"
                  " (empty, over 255 characters) and a request it cannot process with 400, before anything is"
                  " stored or charged; a valid request at the edge (a 255- or 1-character key, an amount of 1)"
                  " is charged as any other."),
}


def retry_after_of(response: object) -> float | None:
    """The seconds a 409 asks the client to wait: body ``retry_after`` (or ``Retry-After``), when positive."""
    if not isinstance(response, Response) or response.status != 409 or not isinstance(response.body, dict):
        return None
    for name, value in response.body.items():
        if str(name).lower().replace("-", "_") == "retry_after" and type(value) in (int, float) and value > 0:
            return float(value)
    return None


@dataclass
class Story:
    """Runs one after another on one database, and what the lab says happened between them: one timeline."""

    requests: list[Request] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    results: list[SessionResult] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    def add(self, requests: Sequence[Request], outcome: RunOutcome) -> None:
        self.requests += requests
        self.rows += outcome.trace.rows
        self.results += outcome.results

    def note(self, session: str, text: str) -> None:
        self.rows.append(Row(session, text))

    def answer(self, session: str) -> object:
        """What the session was answered last (a client that retries keeps its column, and its name)."""
        return next((r.result for r in reversed(self.results) if r.name == session), None)


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
    """Scenario 3: the charge battery in all five states of a key, with crash points, faults and late retries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash = self.info.module("buggy").CRASH
        self.rules.update(RULES)
        self.announced: float | None = None  # the Retry-After a duplicate was told while T1 held the key

    def attacks(self) -> list[Callable[[], Awaitable[bool]]]:
        # The lesson first (the race, then the owner's crash), the other states and the draft's edge cases after it.
        return [self._alone, self._pairs, self._crashes, self._faults, self._failed, self._stalled, self._late,
                self._other_body, self._other_fields, self._malformed, self._keys, self._triples, self._quadruples]

    def observe(self, outcome: RunOutcome) -> None:
        for result in outcome.results:
            if (seconds := retry_after_of(result.result)) is not None:
                self.announced = max(self.announced or 0.0, seconds)

    @property
    def pause(self) -> float:
        """How late a retry comes: the Retry-After the handler announced, or the lab's default when it never did."""
        return self.announced or DEFAULT_WAIT_S

    def _pause_said(self) -> str:
        if self.announced:
            return f"{self.pause:g} s late (its Retry-After)"
        return f"{self.pause:g} s late (no 409 said retry_after: the lab's default)"

    # -- the client: it retries at once, then after each 409 what the 409 asked for -------------------------

    async def _follow(
        self, story: Story, client: str, body: bytes = BODY, key: str = "k1", told: Response | None = None
    ) -> None:
        """``client`` retries at once (or, ``told`` 409 already, after the wait it said), and after each 409 waits
        what it said; every try is a run of its own."""
        assert self.lab is not None
        waits = 0
        answer: object = told
        while True:
            if isinstance(answer, Response) and answer.status == 409:
                if not await self._wait_as_told(story, client, key, answer, waits):
                    return
                waits += 1
            request = Request(client, key, body)
            outcome = await self.lab.run(self.handler, [request], ScriptedChooser([], strict=False), fresh=False)
            story.add([request], outcome)
            answer = outcome.results[0].result
            if not isinstance(answer, Response) or answer.status != 409:
                return

    async def _wait_as_told(self, story: Story, client: str, key: str, answer: Response, waits: int) -> bool:
        """Advance the lab clock by what the 409 asked (or a doubling default); False when the client gives up."""
        asked = retry_after_of(answer)
        if waits == MAX_WAITS:
            said = (f"waited out each Retry-After ({asked:g} s the last time)" if asked else
                    f"waited {DEFAULT_WAIT_S * (2 ** waits - 1):g} s in all (no 409 said retry_after)")
            story.problems.append(("retry_after", f"after {MAX_WAITS} retries {client}'s client {said}, and was"
                                                  f" still told 409: key {key} is stuck"))
            return False
        wait = asked or DEFAULT_WAIT_S * 2**waits
        clock.advance(wait)
        said = f"its retry_after, {wait:g} s" if asked else f"{wait:g} s (it said no retry_after)"
        story.note(client, f"(told 409; after {said} on the lab clock, the client retries)")
        return True

    async def _settle(self, story: Story, chooser: Chooser | None = None, *, overwritten: Sequence[str] = ()) -> Judged:
        """The story's verdict: the recovery invariant over every request, and every answer an answer."""
        anomalies = [*overwritten, *await self.crash.invariant(self.workspace, story.requests)]
        problems = [*story.problems, *[("recovery", a) for a in anomalies], *await self._other_bodies(story)]
        for result in story.results:
            # The provider's failure let through is a 5xx for a charge that did not happen: a fair answer to it.
            passed_on = isinstance(result.error, (ProviderError, TimeoutError))
            if result.error is not None and not result.crashed and not passed_on:
                first_line = str(result.error).split("\n", 1)[0]
                problems.append(("raised", f"{result.name} raised {type(result.error).__name__}: {first_line}"))
        outcome = RunOutcome(Trace(story.rows), story.results, anomalies)
        return Judged(outcome, problems, preemptions_of(chooser, outcome) if chooser is not None else 0)

    async def _other_bodies(self, story: Story) -> list[tuple[str, str]]:
        """A request whose body is not the body of the key's first provider call is never charged, never a success."""
        callers = [r["session"] for r in await self.workspace.admin.fetch(
            f"SELECT session FROM {self.workspace.ledger}.provider_calls ORDER BY call_no")]
        body_of = {r.session: r.body for r in story.requests}
        if not callers or callers[0] not in body_of:
            return []
        problems = []
        for request in story.requests:
            if request.body == body_of[callers[0]]:
                continue
            answer, calls = story.answer(request.session), callers.count(request.session)
            if (isinstance(answer, Response) and 200 <= answer.status < 300) or calls:
                said = f"answered {answer.status}" if isinstance(answer, Response) else "got no answer"
                problems.append(("body", f"{request.session} reused key {request.key} with another body, {said} and"
                                         f" made {calls} provider calls; {callers[0]} had claimed the key first: it"
                                         " must be refused with 422, and never charged"))
        return problems

    async def _calls_by(self, sessions: Sequence[str]) -> int:
        calls: int = await self.workspace.admin.fetchval(
            f"SELECT count(*) FROM {self.workspace.ledger}.provider_calls WHERE session = ANY($1::text[])",
            list(sessions),
        )
        return calls

    # -- the attacks ------------------------------------------------------------------------------------------

    async def _crashes(self) -> bool:
        """An owner that died: T1 crashed at each step boundary; its client retries at once, then as told."""
        assert self.lab is not None
        counting = CrashAfter("T1", None)
        await self.lab.run(self.handler, [Request("T1")], counting)
        judged = []
        for point in range(counting.taken):
            story = Story()
            story.add([Request("T1")], await self.lab.run(self.handler, [Request("T1")], CrashAfter("T1", point)))
            story.note("T2", "(the client saw no answer; it retries at once)")
            await self._follow(story, "T2")
            judged.append(await self._settle(story))
        return self._record("T1 crashed at each step boundary, its client retrying as each 409 says",
                            judged)

    async def _faults(self) -> bool:
        """Failed: the provider fails; the client retries at once, then as each 409 says."""
        assert self.lab is not None
        judged = []
        for what, fault in FAULTS.items():
            story = Story()
            alone = ScriptedChooser([], strict=False)
            first = await self.lab.run(self.handler, [Request("T1")], alone, provider_script=[fault])
            story.add([Request("T1")], first)
            story.note("T2", f"(the provider answered T1 with {what}; its client retries at once)")
            await self._follow(story, "T2")
            judged.append(await self._settle(story))
        return self._record("the provider fails (503, a timeout, a lost answer), then the client retries", judged)

    async def _failed(self) -> bool:
        """A failed key met by each other body, then by two retries racing to take it over."""
        assert self.lab is not None
        judged = []
        for what, body in OTHER_BODIES.items():
            story = await self._failed_key()
            other = Request("T2", body=body)
            story.note("T2", f"(then a request with key k1 and {what})")
            again = await self.lab.run(self.handler, [other], ScriptedChooser([], strict=False), fresh=False)
            story.add([other], again)
            story.note("T3", "(the first client retries its own request)")
            await self._follow(story, "T3")
            judged.append(await self._settle(story))
        if not self._record("a failed key: each other body, then its client's retry", judged):
            return False

        async def race(chooser: Chooser) -> Judged:
            assert self.lab is not None
            story = await self._failed_key()
            story.note("T2", "(two retries of T1's client arrive together)")
            racers = [Request("T2"), Request("T3")]
            story.add(racers, await self.lab.run(self.handler, racers, Guard(chooser, self.budget.max_steps),
                                                 fresh=False))
            if (calls := await self._calls_by(["T2", "T3"])) > 1:
                story.problems.append(("takeover", f"T2 and T3 both took failed key k1 over: {calls} provider calls"))
            for racer in racers:  # a retry told 409 (the key in flight, or still under a lease) retries as told
                answer = story.answer(racer.session)
                if isinstance(answer, Response) and answer.status == 409:
                    await self._follow(story, racer.session, told=answer)
            return await self._settle(story, chooser)

        return await self.explore_bounded("2 retries racing for a failed key", race, self.budget.race_limit)

    async def _failed_key(self) -> Story:
        assert self.lab is not None
        story = Story()
        story.add([Request("T1")], await self.lab.run(self.handler, [Request("T1")], ScriptedChooser([], strict=False),
                                                      provider_script=[FAULTS["503"]]))
        return story

    async def _stalled(self) -> bool:
        """T2 arrives when T1's lease has run out: T1 stalled at each point of its run, and goes on later.

        Twice: with a provider that answers, and with one whose first call never does, so an owner
        that lost its lease and then fails must not mark failed a key its successor holds.
        """
        assert self.lab is not None
        pause = self.pause
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
                story = Story()
                story.add(requests, raced)
                clock.advance(pause)  # whoever was turned away or failed comes back once more, later
                story.note("T3", f"({pause:g} s later on the lab clock, a client retries once more)")
                await self._follow(story, "T3")
                return await self._settle(story, chooser, overwritten=overwritten)

            # Not reduced: the lab clock moves when T2 arrives, a dependency no statement's footprint shows.
            if not await self.explore_runs(f"2 duplicate requests, T2 {self._pause_said()}{how}", run, 2,
                                           self.budget.stall_limit, reduction=False):
                return False
        return True

    async def _late(self) -> bool:
        """Past its lease: T1 stalls at each step; another body, or two retries racing, arrive as late as told."""
        assert self.lab is not None
        pause = self.pause
        judged = []
        for steps, body in itertools.product(range(1, max(self.steps_alone, 1)), OTHER_BODIES.values()):
            story = Story()
            requests = [Request("T1"), Request("T2", body=body)]
            story.add(requests, await self.lab.run(self.handler, requests,
                                                   Guard(Paused(ScriptedChooser([], strict=False), "T1", steps, pause),
                                                         self.budget.max_steps)))
            clock.advance(pause)
            story.note("T3", f"({pause:g} s later on the lab clock, T1's client retries)")
            await self._follow(story, "T3")
            judged.append(await self._settle(story))
        if not self._record(f"each other body {self._pause_said()}, at each step of T1", judged):
            return False
        for steps in range(1, max(self.steps_alone, 1)):

            async def race(chooser: Chooser, steps: int = steps) -> Judged:
                assert self.lab is not None
                story = Story()
                requests = duplicates(3)
                story.add(requests, await self.lab.run(self.handler, requests,
                                                       Guard(Paused(chooser, "T1", steps, pause),
                                                             self.budget.max_steps)))
                if (calls := await self._calls_by(["T2", "T3"])) > 1:
                    story.problems.append(("takeover", f"T2 and T3, arriving when T1's lease had run out, both took"
                                                       f" key k1 over: {calls} provider calls"))
                clock.advance(pause)
                story.note("T4", f"({pause:g} s later on the lab clock, a client retries once more)")
                await self._follow(story, "T4")
                return await self._settle(story, chooser)

            if not await self.explore_bounded(f"2 retries {self._pause_said()}, T1 stalled after {steps}"
                                              f" step{'s' if steps > 1 else ''}", race, self.budget.race_limit,
                                              reduction=False):  # Paused takes T1's steps and moves the clock
                return False
        return True

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

    async def _malformed(self) -> bool:
        assert self.lab is not None
        problems: list[str] = []
        for what, key, body in [*MALFORMED, *VALID_EDGES]:
            outcome = await self.lab.run(self.handler, [Request("T1", key, body)], ScriptedChooser([], strict=False))
            calls = await self.workspace.admin.fetchval(f"SELECT count(*) FROM {self.workspace.ledger}.provider_calls")
            answer = outcome.results[0]
            got = (f"raised {type(answer.error).__name__}" if answer.error is not None
                   else f"answered {getattr(answer.result, 'status', answer.result)}")
            status = getattr(answer.result, "status", None)
            if (what, key, body) in MALFORMED:
                if answer.error is not None or status != 400 or calls:
                    problems.append(f"{what}: {got}" + (f", and the provider was called {calls} times" if calls
                                                        else "") + "; it must be 400, with no provider call")
            elif answer.error is not None or not isinstance(status, int) or not 200 <= status < 300 or calls != 1:
                problems.append(f"{what} is valid: {got}, with {calls} provider calls; it must be charged, 2xx")
        runs = len(MALFORMED) + len(VALID_EDGES)
        name = f"{len(MALFORMED)} malformed requests, each alone, and {len(VALID_EDGES)} valid edges"
        self.verdict.attacks.append(Attack(name, runs, failing=len(problems)))
        if problems:
            self.verdict.failure = Failure(name, len(problems), runs, None, problems, [self.advice("malformed")])
            return False
        return True
