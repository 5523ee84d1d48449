"""Right: lock the SKU's row first, then read, check, compute and write under the lock.

Another design than the lab's fix: ``SELECT ... FOR UPDATE`` on the inventory row serialises every
delivery that touches the SKU, duplicates and different events alike, so computing the new
reservation from the value read is safe (it is the read-modify-write that is wrong without the
lock). The dedup record is checked and written under the same lock, in the same transaction.
Expected verdict: exit 0.
"""

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or not isinstance(event.qty, int) or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id and a positive qty")
    async with db.acquire() as conn, conn.transaction():
        reserved = await conn.fetchval("SELECT reserved FROM inventory WHERE sku = $1 FOR UPDATE", event.sku)
        if reserved is None:
            raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")
        if await conn.fetchval("SELECT 1 FROM processed_events WHERE event_id = $1", event.event_id):
            return
        await conn.execute("INSERT INTO processed_events (event_id) VALUES ($1)", event.event_id)
        await conn.execute("UPDATE inventory SET reserved = $1 WHERE sku = $2", reserved + event.qty, event.sku)
