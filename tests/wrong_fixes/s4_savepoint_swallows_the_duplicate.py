"""Wrong: apply first, then record the event id in a SAVEPOINT, and return quietly on a duplicate.

The claim: "a duplicate id raises, and the exception rolls the reservation back" (true of the right
fix without the inner block, tests/right_fixes/s4_unique_violation_rolls_back.py). But the inner
``conn.transaction()`` is a savepoint: the UniqueViolationError rolls back only the INSERT, the
handler swallows it and returns, and the delivery's transaction commits the UPDATE it made first.
A redelivery reserves the event again. Expected verdict: exit 1, event e1 applied 2 times.
"""

import asyncpg

import lab


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id and a positive qty")
    async with db.acquire() as conn, conn.transaction():
        updated = await conn.execute(
            "UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku
        )
        if updated == "UPDATE 0":
            raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")
        try:
            async with conn.transaction():  # a savepoint: its rollback leaves the UPDATE above in place
                await conn.execute("INSERT INTO processed_events (event_id) VALUES ($1)", event.event_id)
        except asyncpg.UniqueViolationError:
            return  # "a duplicate: rolled back" (only the savepoint was); the UPDATE commits
