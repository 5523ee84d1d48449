"""Wrong: deduplicated right, but the new reservation is computed from a value read before.

The claim: "SELECT reserved, add the event's quantity, write it back: it is all one transaction".
One transaction at READ COMMITTED does not stop another from changing the row in between: two
*different* events for one SKU both read 0, both write their own quantity, and one of them is lost.
Add in the UPDATE itself (reserved = reserved + $1), or lock the row first. Expected verdict: exit 1,
two different events on one SKU, one lost.
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
        reserved = await conn.fetchval("SELECT reserved FROM inventory WHERE sku = $1", event.sku)
        if reserved is None:
            raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")
        await conn.execute("UPDATE inventory SET reserved = $1 WHERE sku = $2", reserved + event.qty, event.sku)
