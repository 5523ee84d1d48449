"""Scenario 4: the inbox that applies an event twice, fixed.

Claim: the business write is gated on the dedup insert, in the same transaction. INSERT ... ON
CONFLICT (event_id) DO NOTHING RETURNING gives a row only to the first delivery that commits; a
redelivery gets none and changes nothing. Recording and applying commit together or not at all, so
a crash anywhere either leaves both undone (the relay redelivers) or both done (the redelivery is a
no-op). An event that can never apply is rejected, and its insert rolled back with it.

Expected: event e1 applied once, whatever the relay redelivers and wherever it crashes.
"""

import lab

SCHEMA = """
CREATE TABLE inventory (
    sku      text PRIMARY KEY,
    reserved int NOT NULL DEFAULT 0
);
CREATE TABLE processed_events (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
"""

SEED = "INSERT INTO inventory (sku) SELECT format('sku-%s', lpad(n::text, 2, '0')) FROM generate_series(1, 20) AS n;"


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    if not event.event_id or event.qty <= 0:
        raise lab.RejectedEvent(f"malformed event {event}: needs an event_id and a positive qty")
    async with db.acquire() as conn, conn.transaction():
        first = await conn.fetchval(
            "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            event.event_id,
        )
        if first is None:
            return  # a redelivery: applied already, by a transaction that committed
        updated = await conn.execute(
            "UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku
        )
        if updated == "UPDATE 0":
            raise lab.RejectedEvent(f"event {event.event_id}: unknown sku {event.sku!r}")  # rolls the INSERT back


# The same relay crash, turn for turn; a turn a finished session cannot take is skipped.
CANONICAL = lab.Schedule.of(
    ("T1", "BEGIN: the relay has handed over e1, reserve 5 of sku-01"),
    ("T1", "INSERT ... RETURNING: e1 is new, 1 row back"),
    ("T1", "UPDATE: sku-01 reserved 0 -> 5"),
    ("T1", "COMMIT: record and reservation are durable together"),
    ("T1!", "the relay crashes before it records the ack"),
    ("T2", "BEGIN: on restart the relay redelivered e1, it was never acked"),
    ("T2", "INSERT ... RETURNING: no row, e1 was applied already"),
    ("T2", "COMMIT: nothing changed"),
    ("T2", "relay records the ack"),
)

INVARIANT = lab.reserved_is_sum_of_distinct_events
