"""Right: check, then apply and record, in a SERIALIZABLE transaction, retried when PostgreSQL refuses it.

Another design than the lab's fix: no ON CONFLICT at all. Under SERIALIZABLE, two deliveries of one
event that both see it unprocessed cannot both commit: one fails with a serialization error (or on
the primary key) and rolls back whole. The consumer then runs its transaction again, as PostgreSQL's
documentation says a serializable client must, and finds the event done. Expected verdict: exit 0.
"""

import asyncpg

import lab

ATTEMPTS = 10
REFUSED = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError, asyncpg.UniqueViolationError)


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or not isinstance(event.qty, int) or event.qty <= 0 or not event.sku:
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id, a sku and a positive qty")
    for attempt in range(ATTEMPTS):
        try:
            await apply_once(db, event)
            return
        except REFUSED:
            if attempt == ATTEMPTS - 1:
                raise


async def apply_once(db: lab.Db, event: lab.Event) -> None:
    async with db.acquire() as conn, conn.transaction(isolation="serializable"):
        if await conn.fetchval("SELECT 1 FROM processed_events WHERE event_id = $1", event.event_id):
            return
        updated = await conn.execute("UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2",
                                     event.qty, event.sku)
        if updated == "UPDATE 0":
            raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")
        await conn.execute("INSERT INTO processed_events (event_id) VALUES ($1)", event.event_id)
