"""The attack on a charge endpoint: duplicate requests with one Idempotency-Key, raced three ways.

1. a hand-written schedule (the scenario's canonical race), shown as a timeline;
2. every interleaving of 2 or 3 sessions: one per class of equivalent ones (``lab.engine.reduction``), or
   all of them by depth-first search over the scheduler's choices (``reduction=False``);
3. stress: N sessions released together by a barrier, many trials, a measured anomaly rate;
4. crash points: one session crashed at each of its step boundaries, then the client's retry.
After every run the invariant is read from the provider's ledger, never from what the handler said;
what each client was answered is recorded beside it (``client_answers``) for invariants to compare.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import asyncpg

from lab.attacks.invariants import Invariant
from lab.attacks.provider import Provider, release_as_is
from lab.contracts import Response
from lab.engine import clock
from lab.engine.conflicts import Catalog, load_catalog
from lab.engine.proxy import ConnectionBank, Connector, SessionDb
from lab.engine.reduction import explore_reduced
from lab.engine.scheduler import Choice, Chooser, Crash, Scheduler, SessionResult, enter_session, render_error
from lab.engine.schedules import DepthFirst, ScriptedChooser
from lab.engine.trace import Row, Trace
from lab.postgres.workspace import Workspace

BODY = json.dumps({"amount": 1000, "currency": "usd"}).encode()
#: The same key with another body, one field at a time: a fingerprint must cover the whole request.
OTHER_BODIES = {
    "another amount": json.dumps({"amount": 5000, "currency": "usd"}).encode(),
    "another currency": json.dumps({"amount": 1000, "currency": "eur"}).encode(),
    "a field added": json.dumps({"amount": 1000, "currency": "usd", "description": "a gift"}).encode(),
    "a field left out": json.dumps({"amount": 1000}).encode(),
}

ChargeHandler = Callable[[Any, Any, str, bytes], Awaitable[Response]]
Progress = Callable[[int], None]


class ChargeScenario(Protocol):
    """What a scenario (or a learner's) module provides for the charge endpoint."""

    SCHEMA: str

    async def handle_charge(self, db: Any, provider: Any, key: str, body: bytes) -> Response: ...


@dataclass(frozen=True)
class Request:
    """One client's request: which session sends it, with which key and body."""

    session: str
    key: str = "k1"
    body: bytes = BODY


def duplicates(sessions: int, key: str = "k1") -> list[Request]:
    """``sessions`` identical requests: the original and its retries."""
    return [Request(f"T{i}", key) for i in range(1, sessions + 1)]


@dataclass
class RunOutcome:
    """One run: what happened (trace), what each client got, and what the ledger says went wrong."""

    trace: Trace
    results: list[SessionResult]
    anomalies: list[str]

    def responses(self) -> dict[str, Response | None]:
        return {r.name: r.result if isinstance(r.result, Response) else None for r in self.results}


Observer = Callable[[RunOutcome], None]  # sees every run of an exploration, for figures and tests


@dataclass
class Exploration:
    """Every interleaving tried: how many broke the invariant, and the simplest one that did."""

    runs: int = 0
    failing: int = 0
    smallest: RunOutcome | None = None
    seconds: float = 0.0
    reduced: bool = False  # one run per class of equivalent interleavings (partial-order reduction)
    replays: int = 0  # reduced runs tried again because the server woke lock waiters in another order


@dataclass
class StressResult:
    trials: int = 0
    failing: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.failing / self.trials if self.trials else 0.0


@dataclass(frozen=True)
class CrashAttack:
    """A scenario's crash-point attack: the original request crashes at each step boundary, then its
    client retries ``retry_after`` seconds later on the lab clock, and ``invariant`` must hold."""

    retry_after: float
    invariant: Invariant


def switches(trace: Trace) -> int:
    """How often the timeline changes hands: the measure of 'smallest' for a failing interleaving."""
    order = trace.order()
    return sum(1 for a, b in itertools.pairwise(order) if a != b)


#: Stress mode waits this long before each statement: the network hop between an app server and its
#: database (0.2-1 ms in a data centre). Over a local Unix socket a round trip is ~30 us, a race window
#: so narrow that whether the second request's backend gets a CPU in time decides the outcome, and on a
#: busy 2-core machine the measured rate swung from 30% to 100%. With the hop it is what production sees.
NETWORK_LATENCY_S = 0.001


class ChargeLab:
    """A workspace, a provider and a bank of backends, reused across thousands of replays."""

    def __init__(
        self,
        workspace: Workspace,
        invariant: Invariant,
        *,
        step_timeout: float = 5.0,
        network_latency: float = NETWORK_LATENCY_S,
        connect: Connector | None = None,
        pool_init: Any = None,  # asyncpg.create_pool(init=...): an async callable taking the new connection
        strong: bool = False,
    ) -> None:
        """``connect`` and ``pool_init`` let a caller watch every backend the sessions and the provider use
        (the benchmark records their statements); by default sessions connect through the workspace.
        ``strong``: ``connect`` puts sessions at REPEATABLE READ or SERIALIZABLE (the reduction then
        takes every step of theirs to conflict with every other)."""
        self.workspace = workspace
        self.strong = strong
        self._catalog: Catalog | None = None  # the schema's tables, read at the first run after an install
        self.invariant = invariant
        self.step_timeout = step_timeout
        self.network_latency = network_latency
        self._pool_init = pool_init
        self._bank = ConnectionBank(connect or workspace.connect)
        self._monitor: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None

    async def __aenter__(self) -> ChargeLab:
        self._monitor = await self.workspace.connect()
        self._pool = await asyncpg.create_pool(
            self.workspace.dsn, min_size=1, max_size=10, server_settings={"application_name": "lab-provider"},
            reset=release_as_is, init=self._pool_init,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._bank.close()
        if self._pool is not None:
            await self._pool.close()
        if self._monitor is not None:
            await self._monitor.close()

    async def install(self, module: ChargeScenario) -> None:
        await self.workspace.install(module.SCHEMA)
        self._catalog = None

    async def run(
        self,
        handler: ChargeHandler,
        requests: list[Request],
        chooser: Chooser,
        *,
        provider_script: list[Any] | None = None,
        fresh: bool = True,
    ) -> RunOutcome:
        """One scheduled run from fresh state; ``fresh=False`` goes on from what the last run left."""
        assert self._monitor is not None and self._pool is not None
        if fresh:
            await self.workspace.reset()
            clock.reset()
        if self._catalog is None:
            self._catalog = await load_catalog(self._monitor, self.workspace.schema)
        scheduler = Scheduler(self._monitor, step_timeout=self.step_timeout, catalog=self._catalog, strong=self.strong)
        provider = Provider(self._pool, self.workspace.ledger, scheduler)
        provider.script.extend(provider_script or [])
        handlers: dict[str, Callable[[], Awaitable[Any]]] = {}
        for request in requests:
            db = await self._bank.db_for(request.session, scheduler)
            handlers[request.session] = _bind(handler, db, provider, request)
        results = await scheduler.run(handlers, chooser)
        got = {r.name: r.result if r.error is None else r.error for r in results if not r.crashed}
        await self._record_answers([(r, got[r.session]) for r in requests if r.session in got])
        anomalies = await self.invariant(self.workspace, requests)
        return RunOutcome(scheduler.trace, results, anomalies)

    async def explore(
        self,
        handler: ChargeHandler,
        requests: list[Request],
        progress: Progress | None = None,
        observe: Observer | None = None,
        *,
        reduction: bool = True,
    ) -> Exploration:
        """Every interleaving of the requests' steps, each replayed from fresh state: one per class of
        equivalent ones, or with ``reduction=False`` every one of them."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        if reduction:
            twins = identical([(r.session, (r.key, r.body)) for r in requests])
            run = partial(self.run, handler, requests)
            return await reduced(run, progress, observe, started, twins)
        found = Exploration()
        chooser: DepthFirst | None = DepthFirst()
        while chooser is not None:
            outcome = await self.run(handler, requests, chooser)
            found.runs += 1
            if observe:
                observe(outcome)
            if outcome.anomalies:
                found.failing += 1
                if found.smallest is None or switches(outcome.trace) < switches(found.smallest.trace):
                    found.smallest = outcome
            if progress:
                progress(found.runs)
            chooser = chooser.next()
        found.seconds = loop.time() - started
        return found

    async def stress(
        self, handler: ChargeHandler, concurrency: int, trials: int, progress: Progress | None = None
    ) -> StressResult:
        """No gates: ``concurrency`` duplicate requests released together by a barrier, ``trials`` times."""
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = StressResult()
        requests = duplicates(concurrency)
        for _ in range(trials):
            await self.workspace.reset()
            clock.reset()
            provider = Provider(self._pool, self.workspace.ledger)
            barrier = asyncio.Barrier(concurrency)
            dbs = [await self._bank.db_for(r.session, None, self.network_latency) for r in requests]
            clients = [
                _released(barrier, _bind(handler, db, provider, r), r.session)
                for db, r in zip(dbs, requests, strict=True)
            ]
            # asyncio.timeout, not wait_for: cancelled (Ctrl-C), wait_for leaves gather's CancelledError
            # unread, and asyncio prints it as a traceback after the lab's one line
            async with asyncio.timeout(self.step_timeout * 4):
                answers = await asyncio.gather(*clients, return_exceptions=True)
            for db in dbs:
                if db.refused is not None:
                    raise db.refused  # a call the lab cannot run as asyncpg would, whatever the handler made of it
            await self._record_answers(list(zip(requests, answers, strict=True)))
            anomalies = await self.invariant(self.workspace, requests)
            result.trials += 1
            if anomalies:
                result.failing += 1
                if len(result.examples) < 3:
                    result.examples.append(anomalies[0])
            if progress:
                progress(result.trials)
        result.seconds = loop.time() - started
        return result

    async def crash_points(
        self,
        handler: ChargeHandler,
        requests: list[Request],
        recovery: list[Request],
        *,
        victim: str = "T1",
        pause: float = 0.0,
        invariant: Invariant | None = None,
        progress: Progress | None = None,
        observe: Observer | None = None,
    ) -> Exploration:
        """Crash ``victim`` at each of its step boundaries in turn; then ``recovery`` runs on what is left.

        Point n crashes the victim before its (n+1)-th step: its backends are terminated (the open
        transaction rolls back) and its task cancelled, while what already left the process stays, a
        commit or a provider charge. ``pause`` seconds later on the lab clock the recovery (the client's
        retry, a redelivery) runs to the end, and ``invariant`` (default: the lab's) is read over both.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        check = invariant or self.invariant
        found = Exploration()
        counting = CrashAfter(victim, None)
        await self.run(handler, requests, counting)
        for point in range(counting.taken):
            crashed = await self.run(handler, requests, CrashAfter(victim, point))
            clock.advance(pause)
            retried = await self.run(handler, recovery, ScriptedChooser([], strict=False), fresh=False)
            later = Row(recovery[0].session, f"({pause:g} s later on the lab clock, the client retries)")
            trace = Trace([*crashed.trace.rows, later, *retried.trace.rows])
            anomalies = await check(self.workspace, [*requests, *recovery])
            outcome = RunOutcome(trace, [*crashed.results, *retried.results], anomalies)
            found.runs += 1
            if observe:
                observe(outcome)
            if anomalies:
                found.failing += 1
                if found.smallest is None:  # the earliest crash point that breaks: the simplest story
                    found.smallest = outcome
            if progress:
                progress(found.runs)
        found.seconds = loop.time() - started
        return found

    async def _record_answers(self, answered: Sequence[tuple[Request, object]]) -> None:
        """What each client got on the wire (an exception is the 500 its framework sends; a crash, nothing)."""
        rows = [(request.session, request.key, *_wire(value)) for request, value in answered]
        rows = [row for row in rows if row[2] is not None]
        if rows:
            await self.workspace.admin.execute(
                f"INSERT INTO {self.workspace.ledger}.client_answers (session, idempotency_key, status, body)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::jsonb[])",
                *(list(column) for column in zip(*rows, strict=True)),
            )


def identical(sessions: Sequence[tuple[str, object]]) -> list[list[str]]:
    """Groups of sessions whose requests are the same: the symmetry the reduction may use."""
    groups: dict[object, list[str]] = {}
    for name, request in sessions:
        groups.setdefault(request, []).append(name)
    return [group for group in groups.values() if len(group) > 1]


async def reduced(
    run: Callable[[Chooser], Awaitable[RunOutcome]], progress: Progress | None, observe: Observer | None,
    started: float, twins: Sequence[Sequence[str]] = (),
) -> Exploration:
    """One run per class of equivalent interleavings; the smallest failing one replayed (lab.engine.reduction)."""
    found = Exploration(reduced=True)

    def seen(outcome: RunOutcome) -> None:
        found.runs += 1
        found.failing += bool(outcome.anomalies)
        if observe:
            observe(outcome)
        if progress:
            progress(found.runs)

    result = await explore_reduced(run, lambda outcome: 0 if outcome.anomalies else None, observe=seen, twins=twins)
    found.smallest = result.smallest
    found.replays = result.replays
    found.seconds = asyncio.get_running_loop().time() - started
    return found


def _wire(value: object) -> tuple[int | None, str]:
    if isinstance(value, Response):
        return value.status, json.dumps(value.body)
    if isinstance(value, BaseException):
        return 500, json.dumps({"error": render_error(value)})
    return None, ""


class CrashAfter:
    """The victim moves first; after ``steps`` of its steps it is crashed. ``None`` never crashes it, and
    counts its steps (``taken``): the number of step boundaries a crash can fall on."""

    def __init__(self, victim: str, steps: int | None) -> None:
        self.victim = victim
        self.steps = steps
        self.taken = 0
        self.crashed = False

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        can_move = self.victim in runnable or self.victim in blocked
        if self.taken == self.steps and not self.crashed and can_move:
            self.crashed = True
            return Crash(self.victim)
        if self.victim in runnable and (self.steps is None or self.taken < self.steps):
            self.taken += 1
            return self.victim
        return runnable[0]


class Paused:
    """``victim`` takes ``steps`` steps, then waits while the others move (each choice among them is ``inner``'s).

    This puts the others' requests in the state the victim left its key in after that many steps: absent
    (0), in flight, completed (all of them). The victim moves again only when no other session can, e.g.
    every other one waits on its lock or has answered. ``late`` seconds pass on the lab clock just before
    the first step of another session: they arrive that much later (past a lease, say). ``steps=None``
    lets the victim run to its end first, and counts its steps (``taken``).
    """

    def __init__(self, inner: Chooser, victim: str = "T1", steps: int | None = None, late: float = 0.0) -> None:
        self.inner, self.victim, self.steps, self.late = inner, victim, steps, late
        self.taken = 0
        self.arrived = False

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        if self.victim in runnable and (self.steps is None or self.taken < self.steps):
            self.taken += 1
            return self.victim
        others = [name for name in runnable if name != self.victim]
        if not others:
            if self.victim in runnable:
                self.taken += 1
            return self.inner.choose(runnable, blocked)
        if not self.arrived:
            self.arrived = True
            clock.advance(self.late)
        return self.inner.choose(others, blocked)


def arriving(handler: ChargeHandler) -> ChargeHandler:
    """The request's first step is its arrival (a no-op statement), so a handler reads the lab clock when
    the schedule lets it arrive, not when the run starts: a retry can come in after a lease ran out.

    Handler code before its first step runs at run start; this is how a schedule says "later".
    """

    async def late(db: Any, provider: Any, key: str, body: bytes) -> Response:
        await db.execute("SELECT 'the request arrives'")
        return await handler(db, provider, key, body)

    return late


def _bind(handler: ChargeHandler, db: SessionDb, provider: Provider, request: Request) -> Callable[[], Awaitable[Any]]:
    async def send() -> Any:
        return await handler(db, provider, request.key, request.body)

    return send


async def _released(barrier: asyncio.Barrier, send: Callable[[], Awaitable[Any]], session: str) -> Any:
    enter_session(session)
    await barrier.wait()
    return await send()
