"""Right: a plain INSERT of the event id, then the UPDATE, in one transaction; a duplicate key means "done".

Another design than the lab's fix: no ON CONFLICT. A redelivery's INSERT fails on the primary key
(waiting first for a delivery still in flight), the exception rolls back its transaction, and the
handler returns, so the relay acks it: the event was applied by the transaction that owns the id.
Expected verdict: exit 0.
"""

import asyncpg

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id and a positive qty")
    try:
        async with db.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO processed_events (event_id) VALUES ($1)", event.event_id)
            updated = await conn.execute(
                "UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku
            )
            if updated == "UPDATE 0":
                raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")
    except asyncpg.UniqueViolationError:
        return  # applied already, by the transaction that inserted the id
