"""The lab's attacks on any asyncpg handler: a user's own endpoint or consumer, invariant and fakes.

The charge and inbox attacks (``lab.attacks.charge``, ``lab.attacks.inbox``) know their contract:
which arguments a handler takes and what the invariant reads. Here the user says all of it. A
*request* is a coroutine function given the session's db (an asyncpg pool, or one connection of
it) that calls their handler as their app would; an *invariant* reads the database (and, if it
asks, the calls the sessions made to the outside world) and returns the anomalies it finds. The
attacks are the lab's own:

1. every interleaving of the requests' steps, fewest preemptions first (``lab.engine.exploration``),
   so that the first failing run found is the simplest one;
2. stress: N copies released together by a barrier, many trials, a measured rate;
3. crash points: the first request crashed before each of its steps, and once after its last (its
   answer lost on the way), then its client's retry;
4. redelivery: a consumer's message crashed at every step boundary, up to twice a run, and
   delivered again until it is acknowledged; and one message delivered to two consumers at once.

The outside world is the lab's provider (``lab.attacks.provider``) or a user's fake wrapped by
:class:`Fake`: each of its coroutine methods becomes a step, recorded with its arguments and what it
returned, and the fake is made anew from its factory for every run, so no replay sees another's calls.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from lab.attacks.charge import NETWORK_LATENCY_S, RunOutcome, identical, switches
from lab.attacks.inbox import CrashSweep
from lab.attacks.provider import Provider, release_as_is
from lab.engine import clock
from lab.engine.conflicts import Catalog, load_catalog
from lab.engine.exploration import FewestFirst, explore
from lab.engine.proxy import ConnectionBank, SessionDb
from lab.engine.scheduler import (
    Choice,
    Chooser,
    Crash,
    HandlerHung,
    ScheduleError,
    Scheduler,
    current_session,
    enter_session,
)
from lab.engine.schedules import ScriptedChooser
from lab.engine.trace import Row, Trace
from lab.errors import LabError
from lab.postgres.workspace import Workspace

Request = Callable[[Any], Awaitable[Any]]  # given the session's db, sends one request: lambda db: create_order(db, ...)
Consumer = Callable[[Any, Any], Awaitable[Any]]  # given the session's db and the message, consumes it
Invariant = Callable[..., Any]  # (db) or (db, calls) -> the anomalies, a list of sentences (or awaitable of it)
HANDS = ("pool", "connection")


@dataclass(frozen=True)
class Call:
    """One call a session made to the outside world, as the lab recorded it (not as the handler says)."""

    session: str | None
    name: str  # "payments.charge", "provider.charge"
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    result: Any = None
    error: str | None = None  # what it raised, one line; None when it returned


@dataclass
class Tried:
    """What one attack ran: how many runs, how many broke the invariant, and the simplest one that did."""

    attack: str  # "every interleaving of 2 requests"
    runs: int = 0
    unit: str = "runs"  # interleavings | trials | crash points | runs
    failing: int = 0
    smallest: RunOutcome | None = None
    preemptions: int | None = None  # of the smallest failing run, where the search counted them
    examples: list[str] = field(default_factory=list)  # stress has no timeline: the anomalies it saw
    complete: bool = True  # False when the budget ran out before every run was made
    seconds: float = 0.0


class Fake:
    """A user's fake of an outside service (a payment gateway) whose every coroutine method is a step.

    ``lab.fake(FakePayments)`` gives the handler this object in place of the service: attribute
    access reaches the current run's instance; a coroutine method waits for its turn, runs, and is
    recorded as a :class:`Call` that the invariant may read. Every run from fresh state gets a new
    instance from ``factory``. Its own attributes are prefixed ``_lab_`` so that no method of the
    fake is hidden by them.
    """

    def __init__(self, factory: Callable[[], Any], name: str) -> None:
        self._lab_factory = factory
        self._lab_name = name
        self._lab_instance: Any = factory()
        self._lab_scheduler: Scheduler | None = None
        self._lab_record: list[Call] = []

    def __repr__(self) -> str:
        return f"<{self._lab_name}: {self._lab_instance!r}, each call a step of the lab>"

    def __getattr__(self, attribute: str) -> Any:
        value = getattr(self._lab_instance, attribute)
        if not inspect.iscoroutinefunction(value):
            return value  # a plain attribute, or a method that cannot wait for a turn: called as it is
        name = f"{self._lab_name}.{attribute}"

        async def stepped(*args: Any, **kwargs: Any) -> Any:
            session = current_session()

            async def call() -> Any:
                try:
                    result = await value(*args, **kwargs)
                except Exception as exc:
                    self._lab_record.append(Call(session, name, args, kwargs, error=_one_line(exc)))
                    raise
                self._lab_record.append(Call(session, name, args, kwargs, result))
                return result

            if self._lab_scheduler is None:
                return await call()
            text = f"{name}({_arguments(args, kwargs)})"
            return await self._lab_scheduler.step(text, call, pid=None, render=lambda result: f"→ {_short(result)}")

        return stepped


class LabProvider:
    """The lab's payment provider for a user's handler: ``charge(reference, amount_cents, idempotency_key=None)``.

    Stable across runs, so the handler can be given it once; each call goes to the current run's
    :class:`lab.attacks.provider.Provider`, whose ledger lives in the workspace's ledger schema.
    """

    def __init__(self) -> None:
        self._current: Provider | None = None

    async def charge(self, reference: str, amount_cents: int, idempotency_key: str | None = None) -> str:
        if self._current is None:
            raise LabError("lab.provider is only for handlers the lab runs (inside an attack)")
        return await self._current.charge(reference, amount_cents, idempotency_key)


def _arity(invariant: Invariant) -> int:
    """How many arguments the invariant takes: 1 (db) or 2 (db, calls); anything else is refused in one line."""
    try:
        parameters = inspect.signature(invariant).parameters.values()
    except (TypeError, ValueError):
        return 1
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters) or len(positional) >= 2:
        return 2
    if len(positional) == 1:
        return 1
    raise LabError(f"the invariant {_name(invariant)} must take the database connection (and optionally the calls)")


async def anomalies_of(invariant: Invariant, conn: asyncpg.Connection, calls: list[Call]) -> list[str]:
    """Ask the invariant; a failed ``assert`` in it is an anomaly too, in its own words."""
    try:
        found = invariant(conn, calls) if _arity(invariant) == 2 else invariant(conn)
        if inspect.isawaitable(found):
            found = await found
    except AssertionError as exc:
        return [_one_line(exc, plain=True) or f"{_name(invariant)}: an assert failed"]
    finally:
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
    if found is None:
        return []
    if isinstance(found, str):
        return [found] if found else []
    if not isinstance(found, Iterable):
        raise LabError(f"the invariant {_name(invariant)} returned {found!r}: return a list of anomalies (empty: held)")
    return [str(anomaly) for anomaly in found]


class HandlerLab:
    """A workspace with a user's tables, a bank of backends, the outside world, and the attacks."""

    def __init__(
        self,
        workspace: Workspace,
        invariant: Invariant,
        *,
        fakes: Sequence[Fake] = (),
        provider: LabProvider | None = None,
        hand: str = "pool",
        step_timeout: float = 5.0,
        network_latency: float = NETWORK_LATENCY_S,
    ) -> None:
        if hand not in HANDS:
            raise LabError(f"db={hand!r}: the handler is given a 'pool' or a 'connection'")
        self._reads_calls = _arity(invariant) == 2
        self.workspace = workspace
        self.invariant = invariant
        self.fakes = list(fakes)
        self.provider = provider or LabProvider()
        self.hand = hand
        self.step_timeout = step_timeout
        self.network_latency = network_latency
        self._bank = ConnectionBank(workspace.connect)
        self._monitor: asyncpg.Connection | None = None
        self._checker: asyncpg.Connection | None = None
        self._catalog: Catalog | None = None  # the user's tables, read at the first run (lab.engine.conflicts)
        self._pool: asyncpg.Pool | None = None
        self._scheduler: Scheduler | None = None
        self._acked = False

    async def __aenter__(self) -> HandlerLab:
        self._monitor = await self.workspace.connect()
        self._checker = await self.workspace.connect()
        self._pool = await asyncpg.create_pool(
            self.workspace.dsn, min_size=1, max_size=10, server_settings={"application_name": "lab-provider"},
            reset=release_as_is,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for fake in self.fakes:
            fake._lab_scheduler = None
        self.provider._current = None
        await self._bank.close()
        if self._pool is not None:
            await self._pool.close()
        for conn in (self._checker, self._monitor):
            if conn is not None:
                await conn.close()

    # -- one run ------------------------------------------------------------------------------------------

    async def run(
        self, requests: Mapping[str, Request], chooser: Chooser, *, fresh: bool = True, check: bool = True
    ) -> RunOutcome:
        """One scheduled run; ``fresh=False`` goes on from what the last run left (a retry after a crash)."""
        assert self._monitor is not None
        if fresh:
            await self._fresh()
        if self._catalog is None:
            self._catalog = await load_catalog(self._monitor, self.workspace.schema)
        scheduler = Scheduler(self._monitor, step_timeout=self.step_timeout, catalog=self._catalog)
        self._attach(scheduler)
        handlers = {
            name: self._send(request, await self._bank.db_for(name, scheduler)) for name, request in requests.items()
        }
        with _explained():
            results = await scheduler.run(handlers, chooser)
        return RunOutcome(scheduler.trace, results, await self.check() if check else [])

    async def check(self) -> list[str]:
        """The invariant, read from the database (and the calls the lab recorded) after a run."""
        assert self._checker is not None
        calls = await self.calls() if self._reads_calls else []  # a round trip saved on every run otherwise
        return await anomalies_of(self.invariant, self._checker, calls)

    async def calls(self) -> list[Call]:
        """Every call to the outside world since the last fresh start: the provider's ledger, then each fake's."""
        ledger = self.workspace.ledger
        rows = await self.workspace.admin.fetch(
            f"SELECT session, reference, amount_cents, idempotency_key, outcome, charge_id"
            f" FROM {ledger}.provider_calls ORDER BY call_no"
        )
        calls = [
            Call(
                r["session"], "provider.charge", (r["reference"], r["amount_cents"]),
                {"idempotency_key": r["idempotency_key"]} if r["idempotency_key"] is not None else {},
                r["charge_id"], None if r["charge_id"] is not None else r["outcome"],
            )
            for r in rows
        ]
        return calls + [call for fake in self.fakes for call in fake._lab_record]

    async def _fresh(self) -> None:
        await self.workspace.reset()
        clock.reset()
        for fake in self.fakes:
            fake._lab_instance = fake._lab_factory()
            fake._lab_record = []

    def _attach(self, scheduler: Scheduler | None) -> None:
        assert self._pool is not None
        self._scheduler = scheduler
        for fake in self.fakes:
            fake._lab_scheduler = scheduler
        self.provider._current = Provider(self._pool, self.workspace.ledger, scheduler)

    def _send(self, request: Request, db: SessionDb) -> Callable[[], Awaitable[Any]]:
        async def send() -> Any:
            if self.hand == "connection":
                async with db.acquire() as conn:
                    return await request(conn)
            return await request(db)

        return send

    # -- the attacks ----------------------------------------------------------------------------------------

    async def every_interleaving(self, requests: Sequence[Request], *, limit: int, what: str) -> Tried:
        """Every interleaving of the requests' steps, one per class of equivalent ones, up to ``limit`` runs.

        The partial-order reduction (``lab.engine.reduction``) runs one interleaving of each class of
        equivalent ones (requests that are the same object are interchangeable), then replays the failing
        one with the fewest preemptions: the smallest failing run is what the user reads.
        """
        named = {f"T{i}": request for i, request in enumerate(requests, 1)}
        tried = Tried(what, unit="interleavings")
        started = _now()

        async def run(chooser: FewestFirst) -> RunOutcome:
            return await self.run(named, chooser)

        twins = identical([(name, id(request)) for name, request in named.items()])
        found = await explore(
            run, lambda outcome: 0 if outcome.anomalies else None, limit=limit, reduction=True, twins=twins
        )
        tried.runs, tried.failing, tried.complete = found.runs, len(found.failing), found.complete
        if found.failing:
            cost, smallest = min(found.failing, key=lambda f: (f[0], switches(f[1].trace), len(f[1].trace.rows)))
            tried.smallest, tried.preemptions, tried.complete = smallest, cost, True
        tried.seconds = _now() - started
        return tried

    async def stress(self, request: Request, *, concurrency: int, trials: int) -> Tried:
        """No gates: ``concurrency`` copies released together by a barrier, ``trials`` times from fresh state."""
        tried = Tried(f"stress: {concurrency} requests released together", unit="trials")
        started = _now()
        names = [f"T{i}" for i in range(1, concurrency + 1)]
        for _ in range(trials):
            await self._fresh()
            self._attach(None)
            barrier = asyncio.Barrier(concurrency)
            dbs = [await self._bank.db_for(name, None, self.network_latency) for name in names]
            sends = [self._send(request, db) for db in dbs]
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(_released(barrier, send, name) for send, name in zip(sends, names, strict=True)),
                                   return_exceptions=True),
                    self.step_timeout * 4,
                )
            except TimeoutError:
                raise LabError(
                    f"under stress, {concurrency} requests released together did not all answer within"
                    f" {self.step_timeout * 4:g} s: does the handler wait on something that never comes?"
                ) from None
            for db in dbs:
                if db.refused is not None:
                    raise db.refused  # a call the lab cannot run as asyncpg would, whatever the handler made of it
            anomalies = await self.check()
            tried.runs += 1
            if anomalies:
                tried.failing += 1
                tried.examples += anomalies[:1] if len(tried.examples) < 3 else []
        tried.seconds = _now() - started
        return tried

    async def crash_points(self, request: Request, retry: Request, *, retry_after: float) -> Tried:
        """Crash the request before each of its steps, and after its last; then its client retries.

        A crash terminates the session's backends (its open transaction rolls back) and cancels its
        task, while what already left the process stays: a commit, a provider charge. After the last
        step the crash loses only the answer, the case a client's retry exists for. ``retry_after``
        seconds later on the lab clock the retry runs alone to the end, and the invariant reads both.
        """
        tried = Tried("crash points, then the client's retry", unit="crash points")
        started = _now()
        counting = _CrashBefore(None)
        await self.run({"T1": request}, counting, check=False)
        for point in range(counting.steps + 1):
            before = point if point < counting.steps else None
            crashed = await self.run({"T1": request}, _CrashBefore(before), check=False)
            rows = list(crashed.trace.rows)
            if before is None:
                rows.append(Row("T1", "✗ crash after its last step: the answer never reached the client"))
            clock.advance(retry_after)
            retried = await self.run({"T2": retry}, ScriptedChooser([], strict=False), fresh=False)
            later = f"({retry_after:g} s later on the lab clock, " if retry_after else "("
            tried.runs += 1
            if retried.anomalies:
                tried.failing += 1
                if tried.smallest is None:  # the earliest crash point that breaks it: the simplest story
                    trace = Trace([*rows, Row("T2", later + "the client retries)"), *retried.trace.rows])
                    tried.smallest = RunOutcome(trace, [*crashed.results, *retried.results], retried.anomalies)
        tried.seconds = _now() - started
        return tried

    async def redelivery(
        self, consume: Consumer, message: Any, *, crashes: int, max_deliveries: int, limit: int
    ) -> list[Tried]:
        """A consumer under an at-least-once broker: crashes at every step boundary, and two deliveries at once."""
        return [
            await self._crash_everywhere(consume, message, crashes=crashes, max_deliveries=max_deliveries),
            await self._delivered_twice_at_once(consume, message, limit=limit),
        ]

    async def _crash_everywhere(self, consume: Consumer, message: Any, *, crashes: int, max_deliveries: int) -> Tried:
        """Depth-first over "step or crash" at every boundary (at most ``crashes`` a run), redelivering until acked."""
        tried = Tried(f"crashes at every step boundary (up to {crashes} a run), redelivered until acknowledged")
        started = _now()
        sweep: CrashSweep | None = CrashSweep(crashes)
        while sweep is not None:
            outcome = await self._deliver_until_acked(consume, message, sweep, max_deliveries)
            tried.runs += 1
            if outcome.anomalies:
                tried.failing += 1
                if tried.smallest is None or len(outcome.trace.rows) < len(tried.smallest.trace.rows):
                    tried.smallest = outcome
            sweep = sweep.next()
        tried.seconds = _now() - started
        return tried

    async def _deliver_until_acked(
        self, consume: Consumer, message: Any, chooser: Chooser, max_deliveries: int
    ) -> RunOutcome:
        """Deliver; while nothing acknowledged the message (a crash, an exception), deliver it again."""
        rows: list[Row] = []
        results = []
        self._acked = False
        for delivery in range(1, max_deliveries + 1):
            session = f"T{delivery}"
            if delivery > 1:
                rows.append(Row(session, f"(no ack: the broker delivers {_short(message, 40)} again)"))
            outcome = await self.run(
                {session: self._delivery(consume, message)}, chooser, fresh=delivery == 1, check=False
            )
            rows += outcome.trace.rows
            results += outcome.results
            if self._acked:
                break
        anomalies = await self.check()
        if not self._acked:
            last = next((r.error for r in reversed(results) if r.error is not None), None)
            why = f": the last raised {_one_line(last)}" if last is not None else ""
            anomalies.append(
                f"message {_short(message, 40)} still unacknowledged after {max_deliveries} deliveries{why}"
            )
        return RunOutcome(Trace(rows), results, anomalies)

    async def _delivered_twice_at_once(self, consume: Consumer, message: Any, *, limit: int) -> Tried:
        """The broker's visibility timeout ran out mid-delivery: two consumers hold one message at once."""
        deliver = self._delivery(consume, message)
        what = "one message delivered to 2 consumers at once"
        return await self.every_interleaving([deliver, deliver], limit=limit, what=what)

    def _delivery(self, consume: Consumer, message: Any) -> Request:
        async def delivered(db: Any) -> Any:
            result = await consume(db, message)
            await self._ack(message)
            return result

        return delivered

    async def _ack(self, message: Any) -> None:
        """The broker records the ack once the consumer returned: a step, so a crash can fall just before it."""

        async def record() -> None:
            self._acked = True

        if self._scheduler is None:
            await record()
            return
        await self._scheduler.step(f"broker.ack({_short(message, 40)})", record, pid=None, render=lambda _: "→ acked")


class _CrashBefore:
    """A lone session that crashes before its ``step``-th step (0: before its first); None counts its ``steps``."""

    def __init__(self, step: int | None) -> None:
        self.step = step
        self.steps = 0

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        name = (runnable or blocked)[0]
        if self.steps == self.step:
            self.step = None
            return Crash(name)
        self.steps += 1
        return name


async def _released(barrier: asyncio.Barrier, send: Callable[[], Awaitable[Any]], session: str) -> Any:
    enter_session(session)
    await barrier.wait()
    return await send()


@contextmanager
def _explained() -> Iterator[None]:
    """What the scheduler raises about a handler, said in words a user can act on."""
    try:
        yield
    except HandlerHung as exc:
        raise LabError(
            f"{exc}: the handler waits on something the lab cannot see (an HTTP call, a sleep, an asyncio.Lock?)."
            " A call that leaves the process goes through lab.provider or a fake wrapped with lab.fake();"
            " requests run on different servers, so only the database can make one wait for another"
        ) from exc
    except ScheduleError as exc:
        raise LabError(
            f"{exc}; the lab replays every run from the same database state, so a handler's steps may"
            " depend only on what it reads (not on the time, randomness or state kept between requests)"
        ) from exc


def _now() -> float:
    return asyncio.get_running_loop().time()


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", repr(function))


def _one_line(exc: BaseException, *, plain: bool = False) -> str:
    text = " ".join(str(exc).split("\n", 1)[0].split())
    return text if plain else f"{type(exc).__name__}: {text}"


def _short(value: Any, limit: int = 32) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    return ", ".join([*(_short(a, 24) for a in args), *(f"{k}={_short(v, 24)}" for k, v in kwargs.items())])
