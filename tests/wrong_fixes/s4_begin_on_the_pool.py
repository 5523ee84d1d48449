"""Wrong: BEGIN and COMMIT sent through the pool, as if the pool were one connection.

The claim: "the dedup insert and the UPDATE are in one transaction now". Each ``db.execute`` takes
a connection from the pool and gives it back, and asyncpg rolls back what a connection left open
when it comes back: the BEGIN ends at once, the INSERT and the UPDATE each commit on their own, and
the COMMIT finds no transaction. A crash between the two records the event without applying it, and
the redelivery skips it. Expected verdict: exit 1, event e1 lost.
"""

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id and a positive qty")
    await db.execute("BEGIN")  # on whichever connection the pool lends, rolled back when it is returned
    first = await db.fetchval(
        "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        event.event_id,
    )
    if first is not None:
        updated = await db.execute("UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku)
        if updated == "UPDATE 0":
            await db.execute("ROLLBACK")
            raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")
    await db.execute("COMMIT")
