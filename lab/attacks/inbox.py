"""The attack on an inbox consumer: the lab plays an at-least-once relay, and crashes it.

A *delivery* is one session: the relay hands the event over (a row on the timeline, written before
the round starts: it commutes with every consumer step, so it is not a step the search must
interleave), the consumer's handler runs, and the relay records the ack, a step. The relay's writes
go through its own connection, so nothing a consumer rolls back can undo them, and a crash anywhere
before the ack (consumer or relay, which to the database is the same thing) leaves the message
unacknowledged. After every round the relay does what it does on restart: it reads what was never
acked and delivers it again, in new sessions, until everything is acked. The attacks:

1. a hand-written schedule (the scenario's canonical crash), shown as a timeline;
2. the same event delivered to two consumers at once, in every interleaving (depth-first);
3. a crash at every step boundary, by depth-first search over "step or crash" at each boundary;
4. a stream of events with random redeliveries and crashes, consumers in parallel (``lab.attacks.inbox_stream``).
After every run the invariant is read from the database: the relay's outbox against ``inventory``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import asyncpg

from lab.attacks.charge import Exploration, Observer, Progress, RunOutcome, identical, reduced
from lab.contracts import Event, RejectedEvent
from lab.engine.conflicts import Access, Catalog, Footprint, load_catalog
from lab.engine.proxy import ConnectionBank, Connector, SessionDb
from lab.engine.scheduler import Choice, Chooser, Crash, Scheduler, SessionResult, render_error
from lab.engine.schedules import DepthFirst
from lab.postgres.workspace import Workspace

T = TypeVar("T")

RELAY_SQL = """
CREATE TABLE relay_outbox (             -- what the producer published: one row per message
    seq      int PRIMARY KEY,
    event_id text,                      -- '' or NULL: the producer left the id empty, or out
    sku      text,                      -- NULL: a message without the field
    qty      int
);
CREATE TABLE relay_deliveries (         -- every time the relay handed a message to a consumer
    seq     int NOT NULL,
    session text NOT NULL
);
CREATE INDEX ON relay_deliveries (seq);
CREATE TABLE relay_acks (               -- recorded by the relay after the consumer returned
    seq     int NOT NULL,
    session text NOT NULL,
    outcome text NOT NULL,              -- applied | dead-lettered
    PRIMARY KEY (seq, session)          -- one ack per delivery: two consumers' acks never touch one row
);
CREATE TABLE dead_letters (             -- messages a consumer rejected, kept for inspection
    seq      int PRIMARY KEY,
    event_id text,
    sku      text,
    qty      int,
    error    text NOT NULL,
    session  text NOT NULL
);
"""

EventHandler = Callable[[Any, Event], Awaitable[None]]
InboxInvariant = Callable[[Workspace], Awaitable[list[str]]]

#: The event of the canonical schedule and the scheduled attacks.
E1 = Event("e1", "sku-01", 5)


class InboxScenario(Protocol):
    """What a scenario (or a learner's) module provides for the inbox consumer."""

    SCHEMA: str
    SEED: str

    async def handle_event(self, db: Any, event: Event) -> None: ...


@dataclass(frozen=True)
class Delivery:
    """The relay hands ``event`` to a consumer running as session ``session``."""

    session: str
    event: Event = E1


def concurrent(sessions: int = 2, event: Event = E1) -> list[Delivery]:
    """One event handed to several consumers at once: the relay's visibility timeout expired mid-delivery."""
    return [Delivery(f"T{i}", event) for i in range(1, sessions + 1)]


class RelayCrashed(Exception):
    """The relay died after the consumer returned, before it recorded an ack or a dead letter."""


class Relay:
    """The relay's half of a delivery, on its own connection; acks and dead letters are steps when scheduled."""

    def __init__(self, conn: asyncpg.Connection, scheduler: Scheduler | None = None) -> None:
        self._conn = conn
        self._scheduler = scheduler

    async def _step(
        self, text: str, action: Callable[[], Awaitable[T]], render: Callable[[T], str], footprint: Footprint
    ) -> T:
        if self._scheduler is None:
            return await action()
        return await self._scheduler.step(text, action, pid=None, render=render, footprint=footprint)

    async def deliver(self, seq: int, event: Event, session: str) -> int:
        """Log the hand-over; the answer is which delivery of this message it is (1 = the first)."""
        attempt: int = await self._conn.fetchval(
            "WITH d AS (INSERT INTO relay_deliveries (seq, session) VALUES ($1, $2))"
            " SELECT count(*) + 1 FROM relay_deliveries WHERE seq = $1",
            seq, session,
        )
        if self._scheduler is not None:
            self._scheduler.trace.add(session, f"relay.deliver({_args(event)})", result=f"→ delivery {attempt}")
        return attempt

    async def ack(self, seq: int, event: Event, session: str) -> None:
        async def record() -> None:
            await self._conn.execute(
                "INSERT INTO relay_acks VALUES ($1, $2, 'applied') ON CONFLICT (seq, session) DO NOTHING", seq, session
            )

        await self._step(f"relay.ack({event.event_id!r})", record, lambda _: "→ acked", _acked(seq, session))

    async def dead_letter(self, seq: int, event: Event, error: str, session: str) -> None:
        """Keep the message and its error for inspection, and ack it: a poison message must not stop the stream."""

        async def record() -> None:
            async with self._conn.transaction():
                await self._conn.execute(
                    "INSERT INTO dead_letters VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (seq) DO NOTHING",
                    seq, event.event_id, event.sku, event.qty, error, session,
                )
                await self._conn.execute(
                    "INSERT INTO relay_acks VALUES ($1, $2, 'dead-lettered') ON CONFLICT (seq, session) DO NOTHING",
                    seq, session,
                )

        lettered = Footprint("relay.dead_letter", _acked(seq, session).accesses | {Access("dead_letters", (), True)})
        await self._step(f"relay.dead_letter({event.event_id!r}, {error!r})", record, lambda _: "→ dead-lettered",
                         lettered)


def _acked(seq: int, session: str) -> Footprint:
    """An ack writes its delivery's own row: acks of one message by two consumers are independent."""
    return Footprint("relay.ack", frozenset({Access("relay_acks", (("seq", str(seq)), ("session", session)), True)}))


def _args(event: Event) -> str:
    return f"{event.event_id!r}, {event.sku!r}, {event.qty}"


async def consume(
    relay: Relay,
    handler: EventHandler,
    db: Any,
    seq: int,
    event: Event,
    session: str,
    *,
    attempt: int,
    max_deliveries: int,
    relay_alive: Callable[[], bool] = lambda: True,
) -> str:
    """A delivery once handed over, the relay's way: the consumer runs, then ack, dead-letter, or neither.

    A rejected event is dead-lettered at once (it will never apply); any other error leaves the
    message unacked, so it comes back, until ``max_deliveries`` have failed. ``relay_alive`` lets a
    stream kill the relay between the consumer's return and the ack.
    """
    error: str | None = None
    try:
        await handler(db, event)
    except RejectedEvent as exc:
        error = str(exc)
    except Exception as exc:
        if attempt < max_deliveries:
            raise  # no ack: the relay delivers it again
        error = f"gave up after {attempt} deliveries: {render_error(exc)}"
    if not relay_alive():
        raise RelayCrashed
    if error is None:
        await relay.ack(seq, event, session)
        return "acked"
    await relay.dead_letter(seq, event, error, session)
    return "dead-lettered"


async def publish(conn: asyncpg.Connection, events: Sequence[Event]) -> list[int]:
    """The producer's side: one outbox message per event, numbered from 1; returns the numbers."""
    seqs = list(range(1, len(events) + 1))
    await conn.executemany(
        "INSERT INTO relay_outbox VALUES ($1, $2, $3, $4)",
        [(seq, e.event_id, e.sku, e.qty) for seq, e in zip(seqs, events, strict=True)],
    )
    return seqs


async def unacked(conn: asyncpg.Connection) -> list[tuple[int, Event]]:
    """What the relay finds on restart: every message it never recorded an ack for, oldest first."""
    rows = await conn.fetch(
        "SELECT seq, event_id, sku, qty FROM relay_outbox o"
        " WHERE NOT EXISTS (SELECT 1 FROM relay_acks a WHERE a.seq = o.seq) ORDER BY seq"
    )
    return [(r["seq"], Event(r["event_id"], r["sku"], r["qty"])) for r in rows]


@dataclass
class CrashSweep:
    """Depth-first over "step or crash" at every step boundary, with at most ``crashes`` crashes per run.

    Like :class:`DepthFirst` the tree is only known by running it (a redelivery takes other steps
    than the first delivery), so each run replays a prefix of decisions and then steps on; only
    boundaries where a crash is still allowed are decisions. Meant for one session at a time.
    """

    crashes: int = 2
    prefix: list[bool] = field(default_factory=list)
    taken: list[bool] = field(default_factory=list)

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        name = runnable[0]
        if sum(self.taken) >= self.crashes:
            return name
        depth = len(self.taken)
        crash = self.prefix[depth] if depth < len(self.prefix) else False
        self.taken.append(crash)
        return Crash(name) if crash else name

    def next(self) -> CrashSweep | None:
        """The next plan: crash at the deepest boundary not yet crashed at, then step on."""
        for depth in range(len(self.taken) - 1, -1, -1):
            if not self.taken[depth]:
                return CrashSweep(self.crashes, [*self.taken[:depth], True])
        return None


class InboxLab:
    """A workspace, the relay's connection and a bank of consumer backends, reused across replays."""

    def __init__(
        self,
        workspace: Workspace,
        invariant: InboxInvariant,
        *,
        step_timeout: float = 5.0,
        max_deliveries: int = 5,
        connect: Connector | None = None,
        strong: bool = False,
    ) -> None:
        """``connect`` opens the consumers' backends (``Workspace.sessions(isolation)``); the relay keeps its own.
        ``strong``: that is REPEATABLE READ or SERIALIZABLE, and the reduction must know (see ChargeLab)."""
        self.workspace = workspace
        self.strong = strong
        self._catalog: Catalog | None = None
        self.invariant = invariant
        self.step_timeout = step_timeout
        self.max_deliveries = max_deliveries
        self._bank = ConnectionBank(connect or workspace.connect)
        self._monitor: asyncpg.Connection | None = None
        self._relay: asyncpg.Connection | None = None

    async def __aenter__(self) -> InboxLab:
        self._monitor = await self.workspace.connect()
        self._relay = await self.workspace.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._bank.close()
        for conn in (self._relay, self._monitor):
            if conn is not None:
                await conn.close()

    async def install(self, module: InboxScenario) -> None:
        await self.workspace.install(module.SCHEMA + RELAY_SQL, module.SEED)
        self._catalog = None

    async def run(self, handler: EventHandler, deliveries: Sequence[Delivery], chooser: Chooser) -> RunOutcome:
        """One scheduled run from fresh state: the deliveries, then the relay's redeliveries until all are acked."""
        assert self._monitor is not None and self._relay is not None
        await self.workspace.reset()
        events = list(dict.fromkeys(d.event for d in deliveries))
        seq_of = dict(zip(events, await publish(self._relay, events), strict=True))
        if self._catalog is None:
            self._catalog = await load_catalog(self._monitor, self.workspace.schema)
        scheduler = Scheduler(  # one trace across every round
            self._monitor, step_timeout=self.step_timeout, catalog=self._catalog, strong=self.strong
        )
        relay = Relay(self._relay, scheduler)
        batch = [(d.session, seq_of[d.event], d.event) for d in deliveries]
        named = len(batch)
        results: list[SessionResult] = []
        for _ in range(self.max_deliveries):
            handlers: dict[str, Callable[[], Awaitable[Any]]] = {}
            for session, seq, event in batch:
                attempt = await relay.deliver(seq, event, session)
                db = await self._bank.db_for(session, scheduler)
                handlers[session] = self._session(relay, handler, db, seq, event, session, attempt)
            results += await scheduler.run(handlers, chooser)
            left = await unacked(self._relay)
            if not left:
                break
            batch = [(f"T{named + i}", seq, event) for i, (seq, event) in enumerate(left, 1)]
            named += len(batch)
        anomalies = await self.invariant(self.workspace)
        return RunOutcome(scheduler.trace, results, anomalies)

    def _session(
        self, relay: Relay, handler: EventHandler, db: SessionDb, seq: int, event: Event, session: str, attempt: int
    ) -> Callable[[], Awaitable[str]]:
        async def delivery() -> str:
            return await consume(
                relay, handler, db, seq, event, session, attempt=attempt, max_deliveries=self.max_deliveries
            )

        return delivery

    async def explore(
        self,
        handler: EventHandler,
        deliveries: Sequence[Delivery],
        progress: Progress | None = None,
        observe: Observer | None = None,
        *,
        reduction: bool = True,
    ) -> Exploration:
        """Every interleaving of the deliveries' steps, each replayed from fresh state (one per class of
        equivalent ones unless ``reduction=False``)."""
        if reduction:
            started = asyncio.get_running_loop().time()
            twins = identical([(d.session, d.event) for d in deliveries])
            return await reduced(
                lambda chooser: self.run(handler, deliveries, chooser), progress, observe, started, twins
            )
        return await self._sweep(handler, deliveries, DepthFirst(), progress, observe)

    async def crash_everywhere(
        self,
        handler: EventHandler,
        event: Event = E1,
        *,
        crashes: int = 2,
        progress: Progress | None = None,
        observe: Observer | None = None,
    ) -> Exploration:
        """One delivery crashed at every step boundary, and its redeliveries too, up to ``crashes`` per run.

        The first run crashes nowhere; every later one differs from an earlier one at one boundary.
        """
        return await self._sweep(handler, [Delivery("T1", event)], CrashSweep(crashes), progress, observe)

    async def _sweep(
        self,
        handler: EventHandler,
        deliveries: Sequence[Delivery],
        first: DepthFirst | CrashSweep,
        progress: Progress | None,
        observe: Observer | None,
    ) -> Exploration:
        loop = asyncio.get_running_loop()
        started = loop.time()
        found = Exploration()
        chooser: DepthFirst | CrashSweep | None = first
        while chooser is not None:
            outcome = await self.run(handler, deliveries, chooser)
            found.runs += 1
            if observe:
                observe(outcome)
            if outcome.anomalies:
                found.failing += 1
                if found.smallest is None or len(outcome.trace.rows) < len(found.smallest.trace.rows):
                    found.smallest = outcome
            if progress:
                progress(found.runs)
            chooser = chooser.next()
        found.seconds = loop.time() - started
        return found


def crash_points(outcome: RunOutcome, session: str = "T1") -> int:
    """Step boundaries in one session's run: where a crash can fall (before each step it took)."""
    steps = [row for row in outcome.trace.rows if row.session == session]
    return sum(1 for row in steps if not row.text.startswith(("<...", "relay.deliver(")))
