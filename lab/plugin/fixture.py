"""The ``lab`` a test gets, and the schema the test works in.

Every attack is a coroutine the test awaits: it opens its connections on the loop that runs it,
snapshots the test's schema as every run's starting state (``Workspace.keep``), attacks, puts the
tables back as they were, and closes what it opened. Nothing outlives the ``await``, so the fixtures
fit any pytest-asyncio loop scope. A run that breaks the invariant fails the test with the lab's
report (:class:`lab.plugin.hooks.InvariantBroken`); a passing attack is recorded for the test's report.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from lab.attacks.charge import NETWORK_LATENCY_S
from lab.attacks.handler import Consumer, Fake, HandlerLab, Invariant, LabProvider, Request, Tried
from lab.errors import LabError
from lab.plugin.hooks import InvariantBroken, NotProven
from lab.plugin.report import failure
from lab.postgres.workspace import Workspace

T = TypeVar("T")


def on_a_private_loop(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to its end on an event loop of its own, in a thread of its own.

    Fixtures that set up and tear down are synchronous, and pytest-asyncio's loop, of whatever
    scope, is either not running or not ours to run: a thread with its own loop touches neither.
    """

    async def run() -> T:
        return await make()

    with ThreadPoolExecutor(1, thread_name_prefix="lab-setup") as pool:
        return pool.submit(asyncio.run, run()).result()


@dataclass(frozen=True)
class Database:
    """A test's own schema on the lab's server: connect to it as the handler's pool does."""

    dsn: str
    schema: str

    @property
    def server_settings(self) -> dict[str, str]:
        """For ``asyncpg.connect`` and ``create_pool``: the test's schema is the only one on the search path."""
        return {"search_path": self.schema}

    async def connect(self, **kwargs: Any) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, server_settings=self.server_settings, **kwargs)

    def create_pool(self, **kwargs: Any) -> asyncpg.Pool:
        """``async with lab_database.create_pool() as pool:``, the pool your app would make."""
        return asyncpg.create_pool(self.dsn, server_settings=self.server_settings, **kwargs)


def create_database(dsn: str, schema: object, notify: Callable[[str], None]) -> Database:
    """A new workspace with the user's schema installed in it; on any error nothing is left behind.

    ``notify`` hears of the schemas of killed labs this start removed: the run's report says it once,
    where it cannot land in whichever test happened to set up first (as that test's captured stderr).
    """

    async def create() -> Database:
        workspace = await Workspace.open(dsn, notify)
        try:
            conn = await workspace.connect()
            try:
                await _migrate(conn, schema)
            finally:
                await conn.close()
        except BaseException:
            await workspace.close()
            raise
        await workspace.admin.close()
        return Database(dsn, workspace.schema)

    try:
        return on_a_private_loop(create)
    except asyncpg.PostgresError as exc:
        problem = f"lab_schema does not install: {type(exc).__name__}: {exc}"
    except LabError as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)  # outside the except: one line, not a chain of two tracebacks


def drop_database(database: Database) -> None:
    async def drop() -> None:
        await Workspace(database.dsn, await asyncpg.connect(database.dsn, timeout=5), database.schema).close()

    on_a_private_loop(drop)


async def _migrate(conn: asyncpg.Connection, schema: object) -> None:
    """SQL text, a .sql file or a folder of them (in name order), or the user's own migrations function."""
    if isinstance(schema, str):
        await conn.execute(schema)
    elif isinstance(schema, Path):
        files = sorted(schema.glob("*.sql")) if schema.is_dir() else [schema]
        if not files:
            raise LabError(f"lab_schema: no .sql files in {schema}")
        for file in files:
            await conn.execute(file.read_text())
    elif callable(schema):
        done = schema(conn)
        if inspect.isawaitable(done):
            await done
    else:
        raise LabError(f"lab_schema returned {schema!r}: return SQL text, a Path, or a function of a connection")


class _Pending:
    """An attack not awaited yet; the fixture fails the test at its end if it never was (it ran nothing)."""

    def __init__(self, call: str, coroutine: Coroutine[Any, Any, Any]) -> None:
        self.call = call
        self.awaited = False
        self._coroutine = coroutine

    def __await__(self) -> Generator[Any, None, Any]:
        self.awaited = True
        return self._coroutine.__await__()

    def close(self) -> None:
        self._coroutine.close()


class Lab:
    """The ``lab`` fixture: the lab's attacks on your handler, each awaited in an async test.

    A *request* is a function of the session's db that calls your handler as your app would:
    ``lambda db: create_order(db, request_id="r-1", ...)``; the db is an asyncpg pool (``db="pool"``)
    or one connection of it (``db="connection"``). An *invariant* reads the database and returns the
    anomalies it finds, one sentence each (``async def invariant(db)`` or ``(db, calls)`` to also read
    the calls to :attr:`provider` and to fakes); a failed ``assert`` in it counts as one.
    """

    def __init__(self, database: Database, *, width: int = 120) -> None:
        self.database = database
        self.width = width
        self.provider = LabProvider()
        self.tried: list[Tried] = []
        self._fakes: list[Fake] = []
        self._pending: list[_Pending] = []

    def fake(self, factory: Callable[[], Any], name: str | None = None) -> Any:
        """Your fake of an outside service, for the handler: each coroutine method call becomes a step.

        ``factory`` (your fake's class, say) makes a new one for every run, so that no replay sees
        another's calls; the calls are recorded and handed to an invariant that takes ``(db, calls)``.
        """
        fake = Fake(factory, name or _service_name(factory))
        self._fakes.append(fake)
        return fake

    def every_interleaving(
        self,
        request: Request | Sequence[Request],
        *,
        invariant: Invariant,
        sessions: int | None = None,
        db: str = "pool",
        limit: int = 5000,
        step_timeout: float = 5.0,
    ) -> Awaitable[Tried]:
        """Run the requests as concurrent sessions in every order of their steps; fail on the simplest that breaks.

        One request is sent ``sessions`` times (default 2): duplicates, as retries are; a list of
        requests is one session each. Interleavings are tried fewest preemptions first and the search
        stops once nothing simpler than its first failure is left; more than ``limit`` runs without
        an end is :class:`NotProven`, not a pass.
        """
        requests, duplicate = _requests(request, sessions)
        _at_least(1, limit=limit)
        what = f"every interleaving of {_requests_named(len(requests), duplicate)}"
        return self._attack(
            "every_interleaving", invariant, db, step_timeout,
            lambda lab: lab.every_interleaving(requests, limit=limit, what=what),
        )

    def stress(
        self,
        request: Request,
        *,
        invariant: Invariant,
        concurrency: int | Sequence[int] = (2, 10),
        trials: int = 50,
        latency_ms: float = 1.0,
        db: str = "pool",
        step_timeout: float = 5.0,
    ) -> Awaitable[list[Tried]]:
        """No schedule: N copies of the request released together by a barrier, ``trials`` times for each N.

        Before each statement a session waits ``latency_ms``, the network between an app server and
        its database, so that the race window is the one production has. A measured rate, no timeline.
        """
        levels = [concurrency] if isinstance(concurrency, int) else list(concurrency)
        _at_least(1, trials=trials)
        for level in levels:
            _at_least(1, concurrency=level)
        if not latency_ms >= 0 or latency_ms == float("inf"):
            raise ValueError(f"latency_ms must be a finite number of milliseconds >= 0, not {latency_ms}")

        async def attack(lab: HandlerLab) -> list[Tried]:
            return [await lab.stress(request, concurrency=n, trials=trials) for n in levels]

        return self._attack("stress", invariant, db, step_timeout, attack, latency=latency_ms / 1000)

    def crash_points(
        self,
        request: Request,
        *,
        invariant: Invariant,
        retry: Request | None = None,
        retry_after: float = 0.0,
        db: str = "pool",
        step_timeout: float = 5.0,
    ) -> Awaitable[Tried]:
        """Crash the request before each of its steps and after its last; then its client retries.

        The crash kills the session's backends (its open transaction rolls back) while what already
        left the process stays (a commit, a charge). ``retry`` (default: the same request) runs
        ``retry_after`` seconds later on the lab clock (``lab.clock``), and the invariant reads both.
        """
        if retry_after < 0:
            raise ValueError(f"retry_after must be >= 0 seconds, not {retry_after}")
        again = retry or request
        return self._attack(
            "crash_points", invariant, db, step_timeout,
            lambda lab: lab.crash_points(request, again, retry_after=retry_after),
        )

    def redelivery(
        self,
        consume: Consumer,
        message: Any,
        *,
        invariant: Invariant,
        crashes: int = 2,
        max_deliveries: int = 5,
        limit: int = 5000,
        db: str = "pool",
        step_timeout: float = 5.0,
    ) -> Awaitable[list[Tried]]:
        """Your consumer, ``consume(db, message)``, under an at-least-once broker.

        The broker acknowledges a message once the consumer returned; until then (a crash, an
        exception) it delivers it again, up to ``max_deliveries``. Attacked: a crash at every step
        boundary, ack included, up to ``crashes`` a run; and two consumers given the message at once.
        """
        _at_least(1, crashes=crashes, max_deliveries=max_deliveries, limit=limit)
        return self._attack(
            "redelivery", invariant, db, step_timeout,
            lambda lab: lab.redelivery(consume, message, crashes=crashes, max_deliveries=max_deliveries, limit=limit),
        )

    def finish(self) -> None:
        """At the test's end: an attack created but never awaited ran nothing, and must not pass silently."""
        never = [pending for pending in self._pending if not pending.awaited]
        for pending in never:
            pending.close()
        if never:
            call = never[0].call
            pytest.fail(
                f"lab.{call}(...) was never awaited, so it attacked nothing: write `await lab.{call}(...)`"
                " in an async test (pytest-asyncio)",
                pytrace=False,
            )

    # -- machinery -------------------------------------------------------------------------------------

    def _attack(
        self,
        call: str,
        invariant: Invariant,
        hand: str,
        step_timeout: float,
        body: Callable[[HandlerLab], Awaitable[T]],
        latency: float = NETWORK_LATENCY_S,
    ) -> Awaitable[T]:
        if not step_timeout > 0:
            raise ValueError(f"step_timeout must be > 0 seconds, not {step_timeout}")
        if hand not in ("pool", "connection"):  # checked when the test calls, not later when it awaits
            raise ValueError(f"db={hand!r}: the handler is given a 'pool' or a 'connection'")
        pending = _Pending(call, self._run(invariant, hand, step_timeout, latency, body))
        self._pending.append(pending)
        return pending

    async def _run(
        self,
        invariant: Invariant,
        hand: str,
        step_timeout: float,
        latency: float,
        body: Callable[[HandlerLab], Awaitable[T]],
    ) -> T:
        workspace = Workspace(self.database.dsn, await asyncpg.connect(self.database.dsn), self.database.schema)
        try:
            await workspace.keep()
            async with HandlerLab(
                workspace, invariant, fakes=self._fakes, provider=self.provider, hand=hand,
                step_timeout=step_timeout, network_latency=latency,
            ) as attacker:
                result = await body(attacker)
            await workspace.reset()  # the tables as the test left them before the attack
        finally:
            await workspace.admin.close()
        for tried in result if isinstance(result, list) else [result]:
            assert isinstance(tried, Tried)
            before = list(self.tried)
            self.tried.append(tried)
            if tried.failing:
                raise InvariantBroken(failure(tried, before, width=self.width))
            if not tried.complete:
                raise NotProven(failure(tried, before, width=self.width))
        return result


def _requests(request: Request | Sequence[Request], sessions: int | None) -> tuple[list[Request], bool]:
    if callable(request):
        count = 2 if sessions is None else sessions
        _at_least(1, sessions=count)
        return [request] * count, True
    requests = list(request)
    if not requests or not all(callable(r) for r in requests):
        raise TypeError("request must be a function of the db, or a list of them (one session each)")
    if sessions is not None and sessions != len(requests):
        raise ValueError(f"sessions={sessions}, but {len(requests)} requests were given (one session each)")
    return requests, False


def _requests_named(count: int, duplicate: bool) -> str:
    if count == 1:
        return "1 request"
    return f"{count} {'duplicate ' if duplicate else ''}requests"


def _at_least(least: int, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be a whole number >= {least}, not {value!r}")


def _service_name(factory: Callable[[], Any]) -> str:
    """``FakePayments`` -> ``payments``: what the timeline calls the service."""
    name = getattr(factory, "__name__", "service").removeprefix("Fake").removesuffix("Fake") or "service"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
