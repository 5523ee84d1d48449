"""The order service: POST /orders with an Idempotency-Key, and the consumer of order.paid events.

Fixed: the database decides who goes first. One INSERT ... ON CONFLICT DO NOTHING claims the
request id (or the event id), in the same transaction as the work it guards; whoever gets no row
back did not win, and does nothing twice. The payment provider gets the request's own key, so a
charge whose transaction died with its server is not charged again by the client's retry.
"""

from pathlib import Path
from typing import Any

MIGRATIONS = Path(__file__).parent / "migrations"


async def migrate(conn: Any) -> None:
    """Apply the migrations in name order (a real app would also record which ones ran)."""
    for migration in sorted(MIGRATIONS.glob("*.sql")):
        await conn.execute(migration.read_text())


async def create_order(
    pool: Any, payments: Any, request_id: str, customer: str, sku: str, amount_cents: int
) -> dict[str, Any]:
    """A retried request must get the order the first one made, and the customer is charged once."""
    async with pool.acquire() as conn, conn.transaction():
        order_id = await conn.fetchval(
            "INSERT INTO orders (request_id, customer, sku, amount_cents) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (request_id) DO NOTHING RETURNING id",
            request_id, customer, sku, amount_cents,
        )
        if order_id is None:  # this request's order exists: answer with it
            existing = await conn.fetchrow("SELECT id, status FROM orders WHERE request_id = $1", request_id)
            return {"order_id": existing["id"], "status": existing["status"]}
        charge_id = await payments.charge(customer, amount_cents, idempotency_key=request_id)
        await conn.execute("UPDATE orders SET status = 'paid', charge_id = $2 WHERE id = $1", order_id, charge_id)
        return {"order_id": order_id, "status": "paid"}


async def reserve_stock(pool: Any, event: dict[str, Any]) -> None:
    """order.paid arrives at least once: reserve the order's items once per event."""
    async with pool.acquire() as conn, conn.transaction():
        first = await conn.fetchval(
            "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING event_id",
            event["event_id"],
        )
        if first is None:
            return  # seen it: a redelivery
        await conn.execute("UPDATE stock SET reserved = reserved + $2 WHERE sku = $1", event["sku"], event["qty"])
