"""Right: the dedup insert and the business write as one statement, a data-modifying CTE.

Another design than the lab's fix: ``WITH new AS (INSERT ... ON CONFLICT DO NOTHING RETURNING)
UPDATE ... FROM new`` updates the inventory only when the insert returned a row, and a single
statement commits or rolls back whole, so no crash can fall between the two. The SKU is checked
first, since an UPDATE of nothing could not tell an unknown SKU from a duplicate. Expected verdict:
exit 0.
"""

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id and a positive qty")
    if not await db.fetchval("SELECT 1 FROM inventory WHERE sku = $1", event.sku):
        raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")
    await db.execute(
        "WITH new AS (INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING"
        " RETURNING event_id)"
        " UPDATE inventory SET reserved = reserved + $2 FROM new WHERE sku = $3",
        event.event_id, event.qty, event.sku,
    )
