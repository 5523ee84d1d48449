"""Wrong: the consumer remembers the event ids it applied, in a set in memory.

The claim: "a redelivered event is in the set, so it is skipped". Until the consumer restarts
(the crash that made the relay redeliver is often the consumer's own), or the redelivery goes to
another consumer; the grader runs every delivery in its own copy of the module, as on its own
server. Expected verdict: exit 1, e1 applied twice after the canonical crash.
"""

import lab

_applied: set[str] = set()  # one per process: gone after a restart, not shared with other consumers


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}")
    if event.event_id in _applied:
        return
    async with db.acquire() as conn, conn.transaction():
        updated = await conn.execute(
            "UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku
        )
        if updated == "UPDATE 0":
            raise lab.RejectedEvent(f"unknown sku {event.sku!r}")
    _applied.add(event.event_id)
