"""The grader behind ``lab check 1``: a charge endpoint attacked rule by rule, in every state its key can be in.

The attack and the invariant come from the registry's scenario, never from the learner's file, and
every count is read from the database (the provider's ledger) after the run. The rules are the
contract's (DESIGN.md's handler contract and the IETF Idempotency-Key draft's status codes), each
named in the verdict that breaks it:

* one charge per key: the provider is called at most once per key (the scenario's invariant);
* every request is answered (an exception, or an answer that is not a ``lab.Response``, is a 500 the client retries);
* a key that was sent is charged: turning every request away is not a fix, and a lone request succeeds;
* a completed key replays its response, byte for byte;
* a duplicate in flight gets 409 (or, once it completed, the stored response): nothing else;
* the same key with another body gets 422: never a success, whatever field differs;
* keys are independent: two keys at once are each charged once and answered their own charge.

A key's states for scenario 1 are absent, in flight and completed. Every state is met by a duplicate
with the same body (every interleaving of 2 requests), by one whose body differs in any field (one
field at a time, arriving at each step the first request takes), and by retries racing each other
(every interleaving of 3, random schedules of 4); then two keys at once, then stress. A verdict is
the first attack that broke a rule and its *smallest* failing run (fewest preemptions), or the list
of attacks that held; what makes grading impossible (a handler that raises on a lone request,
hangs, or behaves differently on replay) is a :class:`CannotGrade`, one line.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from lab.attacks.charge import (
    OTHER_BODIES,
    ChargeLab,
    Paused,
    Request,
    RunOutcome,
    duplicates,
    identical,
    switches,
)
from lab.attacks.invariants import Invariant
from lab.contracts import Response
from lab.engine.exploration import explore
from lab.engine.scheduler import Chooser
from lab.engine.schedules import DepthFirst, Schedule, ScriptedChooser
from lab.engine.search import search
from lab.engine.trace import Row, Trace
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
    preemptions_of,
    schema_errors,
)
from lab.workshop.submission import Submission

Runner = Callable[[Any], Coroutine[Any, Any, "Judged"]]  # one run under the chooser it is given
OTHER_BODY = OTHER_BODIES["another amount"]

# Each rule a charge endpoint is held to: its name in the verdict, then what it asks, in the workshop's words.
RULES = {
    "charged": ("one charge per key", "Two requests with one Idempotency-Key both reached the provider, so the"
                " customer paid twice. Exactly one request may win the key, and the database must decide it in"
                " one atomic step (a unique key, a lock that is held, a conflict you look at); every other"
                " request must not call the provider."),
    "raised": ("every request is answered", "An exception is a 500 to the client, who will retry. Catch what"
               " losing the race raises and answer 409 (still in flight) or the stored response (completed)."),
    "uncharged": ("a key that was sent is charged", "Nobody was charged although nothing crashed: every request"
                  " was turned away, so the customer can never pay. The request that wins the key must process it."),
    "status": ("a lone request succeeds", "A lone request, with nothing racing it, must be charged and answered"
               " with a success (2xx)."),
    "replay": ("a completed key replays its response", "A retry must get the very answer the first request got"
               " (the IETF Idempotency-Key draft): store the response with the key and replay it, status and body."),
    "inflight": ("a duplicate in flight gets 409", "While the first request with a key is in flight, a retry is"
                 " answered 409 Conflict (the draft's code for it), and once it completed, the stored response;"
                 " never another status, never another success."),
    "body": ("another body with the same key gets 422", "The same key with a different body is a client bug, not"
             " a retry: refuse it with 422 (the draft's code), never charge it, never replay the other request's"
             " response for it. Compare a fingerprint of the whole body, every field, not only the amount."),
    "keys": ("keys are independent", "Two requests with different keys are two purchases: each is charged once"
             " and answered with its own charge. Every statement about a key says WHERE key = $1."),
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
        return min(_RANK.get(kind, 3) for kind, _ in self.problems) if self.problems else None

    def size(self) -> tuple[int, int, int, int]:
        """What 'smallest' means: the scenario's own invariant first, then fewest preemptions, switches, steps."""
        rank = len(_RANK) if self.rank is None else self.rank
        return rank, self.preemptions, switches(self.outcome.trace), len(self.outcome.trace.rows)


# A run that broke the scenario's invariant is the lesson; one that only answered wrongly comes after it.
_RANK = {"charged": 0, "recovery": 0, "status": 0, "stored": 0, "takeover": 0, "uncharged": 1, "raised": 2}


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
        self.rules = dict(RULES)
        self.steps_alone = 0  # how many steps a lone request takes: the states its key passes through

    def attacks(self) -> list[Callable[[], Awaitable[bool]]]:
        """The battery in order; each returns False when it broke a rule (and set the verdict)."""
        return [self._alone, self._pairs, self._other_body, self._other_fields, self._keys, self._triples,
                self._quadruples]

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

    def advice(self, kind: str) -> str:
        name, text = self.rules[kind]
        return f"Rule broken: {name}. {text}"

    # -- the attacks, in order; each returns False when it failed (and set the verdict) -----------------

    async def _alone(self) -> bool:
        counting = Paused(DepthFirst())
        judged = await self._run([Request("T1")], counting)
        self.steps_alone = counting.taken
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
        return await self._explore("2 requests, same key, another amount", requests, self.budget.other_body_limit)

    async def _other_fields(self) -> bool:
        """Each other field changed, T2 arriving at each step T1 takes: the key absent, in flight, completed."""
        judged = []
        for body in list(OTHER_BODIES.values())[1:]:
            for steps in range(self.steps_alone + 1):
                judged.append(await self._run([Request("T1"), Request("T2", body=body)], Paused(DepthFirst(), "T1",
                                                                                               steps)))
        return self._record("another currency, a field added or left out, at each step of T1", judged)

    async def _keys(self) -> bool:
        """Two keys at once, every interleaving; then each key retried, to read what it replays."""
        requests = [Request("T1", "k1"), Request("T2", "k2")]
        replays = [Request("T3", "k1"), Request("T4", "k2")]

        async def run(chooser: Chooser) -> Judged:
            assert self.lab is not None
            raced = await self.lab.run(self.handler, requests, Guard(chooser, self.budget.max_steps))
            rows, results = list(raced.trace.rows), list(raced.results)
            for replay in replays:
                again = await self.lab.run(self.handler, [replay], ScriptedChooser([], strict=False), fresh=False)
                rows += [Row(replay.session, f"(then key {replay.key} is retried)"), *again.trace.rows]
                results += again.results
            outcome = RunOutcome(Trace(rows), results, await self.invariant(self.workspace, [*requests, *replays]))
            return await self._judge([*requests, *replays], outcome, chooser)

        return await self.explore_bounded("2 keys at once, then each retried", run, self.budget.keys_limit)

    async def _triples(self) -> bool:
        return await self._explore("3 duplicate requests", duplicates(3), self.budget.triples_limit)

    async def _quadruples(self) -> bool:
        return await self._explore("4 duplicate requests", duplicates(4), self.budget.quadruples_limit)

    async def _explore(self, what: str, requests: list[Request], limit: int) -> bool:
        twins = identical([(r.session, (r.key, r.body)) for r in requests])
        return await self.explore_runs(what, lambda chooser: self._run(requests, chooser), len(requests), limit, twins)

    async def explore_runs(
        self, what: str, run: Runner, sessions: int, limit: int, twins: Sequence[Sequence[str]] = (), *,
        reduction: bool = True,
    ) -> bool:
        """Every interleaving, fewest preemptions first, up to ``limit`` runs; past the limit, random schedules.

        A failure of the scenario's invariant stops the search once every run with as few preemptions
        has been tried, since none after it can be simpler; the attack is named for what it covered.
        Reduced (the budget's default), one run per class of equivalent interleavings, smallest replayed.
        """
        reduce = reduction and self.budget.reduction
        found = await explore(run, lambda judged: judged.rank, limit=limit, reduction=reduce, twins=twins)
        failing = [judged for _, judged in found.failing]
        if name := explored(what, found):
            return self._record(name, failing, runs=found.runs)
        if not self._record(f"{what}: the first {found.runs} interleavings", failing, runs=found.runs):
            return False
        return await self.random_runs(what, run, sessions)

    async def explore_bounded(self, what: str, run: Runner, limit: int, *, reduction: bool = True) -> bool:
        """Interleavings fewest preemptions first, up to ``limit``, with no random schedules after them."""
        reduce = reduction and self.budget.reduction
        found = await explore(run, lambda judged: judged.rank, limit=limit, reduction=reduce)
        failing = [judged for _, judged in found.failing]
        name = explored(what, found) or f"{what}: the {found.runs} simplest interleavings"
        return self._record(name, failing, runs=found.runs)

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
                    self.advice("charged"),
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
        return await self._judge(requests, outcome, chooser)

    async def _judge(self, requests: Sequence[Request], outcome: RunOutcome, chooser: Chooser) -> Judged:
        calls = await self.workspace.admin.fetch(
            f"SELECT session, outcome, charge_id FROM {self.workspace.ledger}.provider_calls ORDER BY call_no"
        )
        problems = [(_kind_of(anomaly), anomaly) for anomaly in outcome.anomalies]
        answers = judge_answers(requests, outcome, [(c["session"], c["outcome"], c["charge_id"]) for c in calls])
        # After a double charge, answers that differ are its echo, not news: only an exception is kept.
        problems += [p for p in answers if p[0] == "raised"] if problems else answers
        self.observe(outcome)
        return Judged(outcome, problems, preemptions_of(chooser, outcome))

    def observe(self, outcome: RunOutcome) -> None:
        """Every run goes past here: a grader that learns from the answers (a Retry-After) looks at them."""

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
            name, failing, runs, smallest.outcome, problems, [self.advice(k) for k in kinds],
            preemptions=preemptions_in(smallest.outcome.trace),
        )
        return False


def _kind_of(anomaly: str) -> str:
    """Which rule an invariant's sentence breaks: a charge counted, or an answer against what the key stores."""
    return "stored" if " replays " in anomaly or "nothing to replay" in anomaly else "charged"


def judge_answers(
    requests: Sequence[Request], outcome: RunOutcome, calls: Sequence[tuple[str | None, str, str | None]]
) -> list[tuple[str, str]]:
    """The draft's answers, key by key, checked against what each session got back and what the ledger recorded."""
    problems: list[tuple[str, str]] = []
    results = {r.name: r for r in outcome.results}
    for result in outcome.results:
        if result.error is not None and not result.crashed:
            first_line = str(result.error).split("\n", 1)[0]
            problems.append(("raised", f"{result.name} raised {type(result.error).__name__}: {first_line}"))
    responses = {name: r.result for name, r in results.items() if isinstance(r.result, Response)}
    key_of = {r.session: r.key for r in requests}
    charges = {cid: key_of.get(s or "") for s, what, cid in calls if what == "charged" and cid}
    for answered in requests:
        charge = _charge_id(responses.get(answered.session))
        if charge is not None and charge in charges and charges[charge] != answered.key:
            problems.append(("keys", f"{answered.session} (key {answered.key}) was answered charge {charge}, which"
                                     f" was made for key {charges[charge]}"))
    order = outcome.trace.order()
    for key in dict.fromkeys(r.key for r in requests):
        mine = [r for r in requests if r.key == key]
        charged = [s for s, what, _ in calls if what == "charged" and key_of.get(s or "") == key]
        problems += _judge_key(key, mine, charged, responses, order, outcome, lone=len(requests) == 1)
    return problems


def _judge_key(
    key: str, requests: list[Request], charged: list[str | None], responses: dict[str, Response],
    order: list[str], outcome: RunOutcome, *, lone: bool,
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if len(requests) == 1:
        alone = responses.get(requests[0].session)
        if not charged or alone is None or not 200 <= alone.status < 300:
            said = f"answered {_show(alone)}" if alone else "got no answer"
            times = f"charged {len(charged)} times"
            kind = "status" if lone else "keys"
            where = "a lone request" if lone else f"{requests[0].session}, the only request for its key,"
            problems.append((kind, f"{where} with key {key} {said}, {times}"))
        return problems
    if not charged:
        if not any(r.error is not None or r.crashed for r in outcome.results):
            problems.append(("uncharged", f"key {key} was never charged: every request was turned away"))
        return problems
    sent = {r.session: r for r in requests}
    winner = sent.get(charged[0] or "")
    won = responses.get(winner.session) if winner else None
    if winner is None or won is None:
        return problems
    for request in requests:
        answer = responses.get(request.session)
        if request.session == winner.session or answer is None:
            continue
        got: Response = answer
        after = _started_after(order, request.session, winner.session)
        if request.body == winner.body:
            if after and got != won:
                problems.append((
                    "replay", f"{request.session} came after {winner.session} had answered {_show(won)},"
                    f" so it must get that stored response; it got {_show(got)}",
                ))
            elif got != won and got.status != 409:
                problems.append((
                    "inflight", f"{request.session} answered {_show(got)}, but {winner.session}, which charged,"
                    f" answered {_show(won)}: a duplicate gets that stored response, or 409 while it is in flight",
                ))
        elif 200 <= got.status < 300 or (after and got.status != 422):
            problems.append((
                "body", f"{request.session} reused key {request.key} with a different body and got {_show(got)};"
                " it must be refused with 422",
            ))
    return problems


def _charge_id(response: Response | None) -> str | None:
    if response is None or not 200 <= response.status < 300:
        return None
    charge = response.body.get("charge_id") if isinstance(response.body, dict) else None
    return charge if isinstance(charge, str) else None


def _started_after(order: list[str], later: str, earlier: str) -> bool:
    """``later`` took its first step after ``earlier`` took its last: no overlap at all."""
    firsts = [i for i, who in enumerate(order) if who == later]
    lasts = [i for i, who in enumerate(order) if who == earlier]
    return bool(firsts and lasts) and firsts[0] > lasts[-1]


def _show(response: Response) -> str:
    return f"{response.status} {json.dumps(response.body, sort_keys=True)}"
