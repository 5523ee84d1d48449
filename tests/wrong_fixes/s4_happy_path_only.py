"""Wrong: the dedup is right, but an event that can never apply is applied, or recorded, anyway.

The claim: "the race is fixed; bad events are the producer's problem". They become the consumer's:
a quantity of 0 or less is reserved as is, an event without an id is applied under the id '', and
an unknown SKU is recorded as processed although nothing was reserved, so the stream acks it
silently. The draft's answer is to reject it (lab.RejectedEvent), so the relay dead-letters it.
Expected verdict: exit 1, the malformed events are accepted.
"""

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    async with db.acquire() as conn, conn.transaction():
        first = await conn.fetchval(
            "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            event.event_id,
        )
        if first is None:
            return
        await conn.execute("UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku)
