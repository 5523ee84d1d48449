"""A wrong fix for scenario 4: it gates the UPDATE on the dedup insert, but in a second transaction.

It passes every interleaving of two concurrent deliveries (only one wins the insert, and nothing
crashes). A crash between its two commits records the event without applying it; the redelivery
then finds it recorded and skips it, so the reservation is lost for good.
"""

import lab
from fixes.s4_inbox_double_apply import INVARIANT, SCHEMA, SEED

__all__ = ["INVARIANT", "SCHEMA", "SEED", "handle_event"]


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    async with db.acquire() as conn:
        async with conn.transaction():
            first = await conn.fetchval(
                "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING"
                " RETURNING event_id",
                event.event_id,
            )
        if first is None:
            return
        async with conn.transaction():  # a crash before this commit loses the event for good
            await conn.execute("UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku)
