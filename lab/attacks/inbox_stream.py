"""Scenario 4 at volume: a stream of events through an unreliable relay, consumers in parallel, no gates.

The relay is at-least-once the way real ones are: it hands a second copy of a message to another
consumer while the first is still working on it (a visibility timeout that expired), the producer
sometimes publishes the same event twice, and deliveries die at random step boundaries: a consumer
mid-transaction (its connection is cut, so the server rolls it back), or the relay after the consumer
returned but before it recorded the ack. Whatever was never acked is delivered again in the next
pass, as a restarted relay would, until everything is acked or dead-lettered.

Every random decision is drawn from a generator seeded by (seed, message, pass, copy), never by the
order in which consumers happen to finish, so a seed names the same faults on every run even though
the consumers really race. The verdict is read from the database, like every other attack's.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from lab.attacks.inbox import EventHandler, InboxInvariant, Relay, RelayCrashed, consume, publish, unacked
from lab.attacks.invariants import inventory_drift
from lab.contracts import Event
from lab.engine.proxy import Connector, SessionDb, StepConnection
from lab.engine.scheduler import render_error
from lab.postgres.workspace import Workspace

#: A crash falls before the consumer's k-th statement, k in 1..CRASH_SPAN; past its last one, on the relay.
CRASH_SPAN = 5


@dataclass(frozen=True)
class StreamPlan:
    """What the stream throws at a consumer. The defaults are the issue's: 1,000 events for 20 SKUs."""

    events: int = 1000
    skus: int = 20
    consumers: int = 4
    seed: int = 1
    duplicate_rate: float = 0.1  # a second copy handed out while the first is in flight
    crash_rate: float = 0.1  # a delivery dies at a random step boundary
    republish_rate: float = 0.05  # the producer publishes the event again, as a new message
    malformed: int = 0  # malformed messages mixed in: qty <= 0, unknown SKU, missing id, in turn
    max_deliveries: int = 5  # a message that failed this often is dead-lettered


@dataclass
class StreamResult:
    """What happened, counted by the relay and read back from the database."""

    plan: StreamPlan
    messages: int = 0
    acked: set[int] = field(default_factory=set)  # messages the relay recorded an ack (or dead letter) for
    deliveries: int = 0
    duplicates: int = 0
    consumer_crashes: int = 0
    relay_crashes: int = 0
    errors: list[str] = field(default_factory=list)  # other than a rejection: left unacked, delivered again
    dead_letters: int = 0
    passes: int = 0
    surplus: int = 0  # units reserved beyond the distinct events' quantities
    lost: int = 0  # units of distinct events never reserved
    anomalies: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def redeliveries(self) -> int:
        return self.deliveries - self.messages

    @property
    def crashes(self) -> int:
        return self.consumer_crashes + self.relay_crashes

    @property
    def events_per_s(self) -> float:
        return self.plan.events / self.seconds if self.seconds else 0.0


def stream_messages(plan: StreamPlan, skus: Sequence[str]) -> list[Event]:
    """The producer's messages, in publishing order: every event once, some twice, malformed ones mixed in."""
    rng = random.Random(plan.seed)
    keyed: list[tuple[float, Event]] = []
    for i in range(plan.events):
        event = Event(f"ev-{i + 1:04d}", rng.choice(skus), rng.randint(1, 9))
        keyed.append((i, event))
        if rng.random() < plan.republish_rate:
            keyed.append((rng.uniform(i, plan.events), event))  # published again, some time later
    for i in range(plan.malformed):
        kinds = (
            Event(f"bad-{i + 1:03d}", rng.choice(skus), -rng.randint(0, 3)),
            Event(f"bad-{i + 1:03d}", "sku-unknown", rng.randint(1, 9)),
            Event("", rng.choice(skus), rng.randint(1, 9)),
        )
        keyed.append((rng.uniform(0, plan.events), kinds[i % 3]))
    return [event for _, event in sorted(keyed, key=lambda pair: pair[0])]


class _Crashed(BaseException):
    """The consumer died mid-delivery: a BaseException, so a handler's ``except Exception`` cannot swallow it."""


class _FaultyConnection(StepConnection):
    """A consumer backend whose process dies before its n-th statement: from then on it sends nothing (not
    the ROLLBACK on the way out, not the pool's reset), and its socket is cut when the consumer restarts."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__(conn, None)
        self.crash_before: int | None = None
        self.statements = 0
        self.dead = False

    def arm(self, crash_before: int | None) -> None:
        self.crash_before, self.statements = crash_before, 0

    async def _step(
        self,
        sql: str,
        args: Sequence[Any],
        run: Callable[[], Awaitable[Any]],
        render: Callable[[Any], str],
        *,
        shown: str | None = None,
        quiet: bool = False,
        many: bool = False,
    ) -> Any:
        if self.dead:
            raise _Crashed
        if not quiet:  # what asyncpg sends on its own at release is not one of the handler's statements
            self.statements += 1
            if self.statements == self.crash_before:
                self.crash_before, self.dead = None, True
                raise _Crashed
        return await run()


@dataclass
class _Consumer:
    """One consumer process, with the relay's connection that feeds it."""

    name: str
    sessions: Connector  # the consumer's own backends; the relay's is the lab's, at the server's default level
    relay: Relay
    relay_conn: asyncpg.Connection
    conn: _FaultyConnection
    spare: list[asyncpg.Connection] = field(default_factory=list)  # extra backends a handler asked for

    @classmethod
    async def open(cls, name: str, workspace: Workspace, sessions: Connector) -> _Consumer:
        relay_conn = await workspace.connect()
        return cls(name, sessions, Relay(relay_conn), relay_conn, _FaultyConnection(await sessions()))

    def db(self) -> SessionDb:
        async def connect() -> asyncpg.Connection:
            conn = await self.sessions()
            self.spare.append(conn)
            return conn

        return SessionDb([self.conn], connect, None)

    async def restart(self) -> None:
        """After a crash the consumer comes back with a fresh backend, as a restarted process would."""
        self.conn.raw.terminate()  # the dead process's socket closes: the server rolls its transaction back
        self.conn = _FaultyConnection(await self.sessions())

    async def close(self) -> None:
        for conn in (self.relay_conn, self.conn.raw, *self.spare):
            if not conn.is_closed():
                conn.terminate()


async def run_stream(
    workspace: Workspace,
    handler: EventHandler,
    invariant: InboxInvariant,
    plan: StreamPlan,
    progress: Callable[[int], None] | None = None,
    sessions: Connector | None = None,
) -> StreamResult:
    """Publish the stream, deliver it until every message is acked or dead-lettered, then read the verdict.

    ``sessions`` connects the consumers' backends (default: the workspace's, at the server's level).
    """
    await workspace.reset()
    s = workspace.schema
    skus = [r["sku"] for r in await workspace.admin.fetch(f"SELECT sku FROM {s}.inventory ORDER BY sku")][: plan.skus]
    messages = stream_messages(plan, skus)
    result = StreamResult(plan, messages=len(messages))
    connect = sessions or workspace.sessions()
    consumers = [await _Consumer.open(f"C{i}", workspace, connect) for i in range(1, plan.consumers + 1)]
    try:
        await publish(consumers[0].relay_conn, messages)
        loop = asyncio.get_running_loop()
        started = loop.time()
        while left := await unacked(consumers[0].relay_conn):
            if result.passes > plan.max_deliveries:
                break  # what is still unacked is reported by the invariant as never acknowledged
            result.passes += 1
            queue: deque[tuple[int, Event, int]] = deque((seq, event, 0) for seq, event in left)
            await asyncio.gather(*(_work(c, handler, plan, result, queue, progress) for c in consumers))
        result.seconds = loop.time() - started
    finally:
        for consumer in consumers:
            await consumer.close()
    result.anomalies = await invariant(workspace)
    for _sku, reserved, expected, _events in await inventory_drift(workspace):
        result.surplus += max(0, reserved - expected)
        result.lost += max(0, expected - reserved)
    result.deliveries = await workspace.admin.fetchval(f"SELECT count(*) FROM {s}.relay_deliveries")
    result.dead_letters = await workspace.admin.fetchval(f"SELECT count(*) FROM {s}.dead_letters")
    return result


async def _work(
    consumer: _Consumer,
    handler: EventHandler,
    plan: StreamPlan,
    result: StreamResult,
    queue: deque[tuple[int, Event, int]],
    progress: Callable[[int], None] | None,
) -> None:
    """A consumer takes the next message until the pass is drained (asyncio: no lock needed for the deque)."""
    while queue:
        seq, event, copy = queue.popleft()
        if await _deliver_one(consumer, handler, plan, result, queue, seq, event, copy):
            result.acked.add(seq)
            if progress:
                progress(len(result.acked))


async def _deliver_one(
    consumer: _Consumer,
    handler: EventHandler,
    plan: StreamPlan,
    result: StreamResult,
    queue: deque[tuple[int, Event, int]],
    seq: int,
    event: Event,
    copy: int,
) -> bool:
    """One delivery with its faults drawn from the seed; True when the relay recorded an ack."""
    rng = random.Random(f"{plan.seed}/{seq}/{result.passes}/{copy}")
    if copy == 0 and rng.random() < plan.duplicate_rate:
        queue.appendleft((seq, event, 1))  # the next free consumer takes it while this one works
        result.duplicates += 1
    crash_before = rng.randint(1, CRASH_SPAN) if rng.random() < plan.crash_rate else None
    attempt = await consumer.relay.deliver(seq, event, consumer.name)
    consumer.conn.arm(crash_before)
    db = consumer.db()
    try:
        await consume(
            consumer.relay, handler, db, seq, event, consumer.name, attempt=attempt,
            max_deliveries=plan.max_deliveries, relay_alive=lambda: consumer.conn.crash_before is None,
        )
    except _Crashed:
        result.consumer_crashes += 1
        await consumer.restart()
        return False
    except RelayCrashed:
        result.relay_crashes += 1
        consumer.conn.arm(None)
        return False
    except Exception as exc:
        result.errors.append(f"{event.event_id!r}: {render_error(exc)}")
        return False
    finally:
        if db.refused is not None:
            raise db.refused  # a call the lab cannot run as asyncpg would: the stream cannot be graded
    return True
