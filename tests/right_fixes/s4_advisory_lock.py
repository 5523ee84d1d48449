"""Right: deliveries of one event queue on an advisory lock; under it, check, record and apply.

Another design than the lab's fix: ``pg_advisory_xact_lock(hashtext(event_id))`` serialises every
delivery of the event, and it is held until the transaction ends, so the check under it cannot go
stale: a concurrent delivery waits, then finds the event recorded. Recording and applying commit
together. Expected verdict: exit 0.
"""

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id and a positive qty")
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", event.event_id)
        if await conn.fetchval("SELECT 1 FROM processed_events WHERE event_id = $1", event.event_id):
            return
        updated = await conn.execute("UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2",
                                     event.qty, event.sku)
        if updated == "UPDATE 0":
            raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")
        await conn.execute("INSERT INTO processed_events (event_id) VALUES ($1)", event.event_id)
