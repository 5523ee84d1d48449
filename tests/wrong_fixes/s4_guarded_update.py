"""Wrong: one guarded UPDATE, "apply unless already processed", then record the event.

The claim: "the UPDATE's WHERE NOT EXISTS makes the check and the write one statement". One
statement is not one snapshot away from a race: the second delivery's UPDATE waits for the first's
row lock, and when it goes on PostgreSQL re-checks the updated row, not the NOT EXISTS subquery,
which still sees the snapshot taken before the first delivery committed. Expected verdict: exit 1,
e1 applied twice by two concurrent deliveries.
"""

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}")
    async with db.acquire() as conn, conn.transaction():
        exists = await conn.fetchval("SELECT 1 FROM inventory WHERE sku = $1", event.sku)
        if not exists:
            raise lab.RejectedEvent(f"unknown sku {event.sku!r}")
        await conn.execute(
            "UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2"
            " AND NOT EXISTS (SELECT 1 FROM processed_events WHERE event_id = $3)",
            event.qty, event.sku, event.event_id,
        )
        await conn.execute(
            "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING", event.event_id
        )
