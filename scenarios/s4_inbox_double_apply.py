"""Scenario 4: the inbox that applies an event twice (snippet 4, ported from SQL).

Claim: the consumer records the event id with INSERT ... ON CONFLICT (event_id) DO NOTHING, then
reserves stock with an UPDATE that runs whether or not the insert did anything. The relay delivers
at least once: when it crashes after the consumer committed but before it recorded the ack, it
delivers the same event again on restart; the insert quietly does nothing, and the UPDATE applies
the reservation a second time.

Expected: event e1 applied 2 times (sku-01 reserved 10, expected 5).
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
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING",
            event.event_id,
        )
        # always applied, regardless of whether the insert above did anything:
        await conn.execute("UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty, event.sku)


# The lab plays the relay (read it like a Hermitage test: who moves, and what they see).
CANONICAL = lab.Schedule.of(
    ("T1", "BEGIN: the relay has handed over e1, reserve 5 of sku-01"),
    ("T1", "INSERT e1 into processed_events: 1 row"),
    ("T1", "UPDATE: sku-01 reserved 0 -> 5"),
    ("T1", "COMMIT: the reservation is durable"),
    ("T1!", "the relay crashes before it records the ack"),
    ("T2", "BEGIN: on restart the relay redelivered e1, it was never acked"),
    ("T2", "INSERT ... ON CONFLICT DO NOTHING: 0 rows, and nobody looks"),
    ("T2", "UPDATE: sku-01 reserved 5 -> 10, the event applied twice"),
    ("T2", "COMMIT"),
    ("T2", "relay records the ack"),
)

INVARIANT = lab.reserved_is_sum_of_distinct_events
