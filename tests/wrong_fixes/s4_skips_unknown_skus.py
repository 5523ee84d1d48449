"""Wrong: an event for an unknown SKU is acknowledged as done, "there is nothing to reserve".

The claim: "an UPDATE of no row is a no-op, so the event is simply skipped". It is recorded as
processed and acked, and lost for good: nobody learns that the producer sent an order for a SKU
that does not exist. An event that can never apply is rejected (``lab.RejectedEvent``), which rolls
back its dedup record, and the relay dead-letters it. Expected verdict: exit 1, a malformed event
accepted.
"""

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id and a positive qty")
    async with db.acquire() as conn, conn.transaction():
        first = await conn.fetchval(
            "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            event.event_id,
        )
        if first is None:
            return
        await conn.execute("UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku)
