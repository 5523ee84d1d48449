"""Right: the database refuses what is malformed, with a CHECK and a foreign key, and the consumer says so.

Another design than the lab's fix: the dedup table records each event's SKU and quantity, with a
foreign key to inventory and ``CHECK (qty > 0)``, so the INSERT itself fails on an unknown SKU or a
quantity that is not positive, and the consumer turns those errors into ``lab.RejectedEvent``. A
NOT NULL does the same for a missing field. The file brings its own SCHEMA (the lab seeds the
inventory the same way). Expected verdict: exit 0.
"""

import asyncpg

import lab

SCHEMA = """
CREATE TABLE inventory (
    sku      text PRIMARY KEY,
    reserved int NOT NULL DEFAULT 0
);
CREATE TABLE processed_events (
    event_id     text PRIMARY KEY CHECK (event_id <> ''),
    sku          text NOT NULL REFERENCES inventory (sku),
    qty          int NOT NULL CHECK (qty > 0),
    processed_at timestamptz NOT NULL DEFAULT now()
);
"""


async def handle_event(db: lab.Db, event: lab.Event) -> None:
    try:
        async with db.acquire() as conn, conn.transaction():
            first = await conn.fetchval(
                "INSERT INTO processed_events (event_id, sku, qty) VALUES ($1, $2, $3)"
                " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
                event.event_id, event.sku, event.qty,
            )
            if first is not None:
                await conn.execute("UPDATE inventory SET reserved = reserved + $1 WHERE sku = $2", event.qty,
                                   event.sku)
    except (asyncpg.CheckViolationError, asyncpg.ForeignKeyViolationError, asyncpg.NotNullViolationError) as exc:
        raise lab.RejectedEvent(f"malformed event {event}: {exc}") from exc
