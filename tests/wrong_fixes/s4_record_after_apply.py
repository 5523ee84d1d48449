"""Wrong: apply the reservation in one transaction, then record the event in a second one.

The claim: "the event is only marked processed once the reservation has committed, so nothing is
lost". Nothing is lost, but a crash between the two commits leaves the reservation made and the
event unrecorded: the relay redelivers it, and it is applied again. (The mirror image of recording
first, which loses the event instead.) Expected verdict: exit 1, e1 applied twice after a crash.
"""

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}")
    async with db.acquire() as conn:
        seen = await conn.fetchval("SELECT 1 FROM processed_events WHERE event_id = $1", event.event_id)
        if seen:
            return
        async with conn.transaction():
            updated = await conn.execute(
                "UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku
            )
            if updated == "UPDATE 0":
                raise lab.RejectedEvent(f"unknown sku {event.sku!r}")
        async with conn.transaction():  # a crash before this commit: applied, but not recorded
            await conn.execute(
                "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING",
                event.event_id,
            )
