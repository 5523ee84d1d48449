"""Right: the event id is recorded inside a SAVEPOINT; a duplicate rolls back to it, and nothing is applied.

Another design than the lab's fix, as someone used to Django's nested ``atomic()`` writes it: a
nested ``conn.transaction()`` is a savepoint, so the primary key's UniqueViolationError undoes only
the INSERT, and the delivery's own transaction goes on to commit nothing. A first delivery releases
the savepoint and applies the event in the same transaction, so recording and applying commit
together. (A db that turned the inner block into a second BEGIN would commit the id on its own, and
a crash before the UPDATE would lose the event.) Expected verdict: exit 0.
"""

import asyncpg

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id and a positive qty")
    async with db.acquire() as conn, conn.transaction():
        try:
            async with conn.transaction():  # SAVEPOINT: a duplicate id rolls back to here, not further
                await conn.execute("INSERT INTO processed_events (event_id) VALUES ($1)", event.event_id)
        except asyncpg.UniqueViolationError:
            return  # applied already, by the transaction that owns the id: this one commits nothing
        updated = await conn.execute(
            "UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku
        )
        if updated == "UPDATE 0":
            raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")  # rolls it all back
