"""Wrong: look the event up first, apply it if it is new, then record it "to be safe".

The claim: "a redelivery finds the event recorded and skips it". One that comes after the commit
does. Two deliveries at once both find nothing (READ COMMITTED sees no uncommitted row), both apply,
and the second record's ON CONFLICT DO NOTHING hides the duplicate. Expected verdict: exit 1, an
interleaving of 2 concurrent deliveries applies e1 twice.
"""

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}")
    async with db.acquire() as conn, conn.transaction():
        seen = await conn.fetchval("SELECT 1 FROM processed_events WHERE event_id = $1", event.event_id)
        if seen:
            return
        updated = await conn.execute(
            "UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku
        )
        if updated == "UPDATE 0":
            raise lab.RejectedEvent(f"unknown sku {event.sku!r}")
        await conn.execute(  # too late to decide anything: the UPDATE above already ran
            "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING", event.event_id
        )
