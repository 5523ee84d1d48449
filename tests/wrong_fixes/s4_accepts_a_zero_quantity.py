"""Wrong: the lab's consumer, but its check says ``qty < 0``: an event for a quantity of 0 is applied.

The claim: "reserving nothing is harmless, so only a negative quantity is malformed". It changes
no stock, but it is recorded as processed and acknowledged as applied, when the producer sent an
event that means nothing: it should be rejected (``lab.RejectedEvent``) and dead-lettered, where
someone will look at it. Expected verdict: exit 1, a malformed event accepted.
"""

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty < 0:  # a quantity of 0 gets through
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id and a non-negative qty")
    async with db.acquire() as conn, conn.transaction():
        first = await conn.fetchval(
            "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            event.event_id,
        )
        if first is None:
            return
        updated = await conn.execute(
            "UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku
        )
        if updated == "UPDATE 0":
            raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")
