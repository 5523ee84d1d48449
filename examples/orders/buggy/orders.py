"""The order service: POST /orders with an Idempotency-Key, and the consumer of order.paid events.

Written the way a busy team writes it: check first, then act. Both look idempotent in review, and
each passes every test that sends one request at a time.
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
    existing = await pool.fetchrow("SELECT id, status FROM orders WHERE request_id = $1", request_id)
    if existing is not None:
        return {"order_id": existing["id"], "status": existing["status"]}
    order_id = await pool.fetchval(
        "INSERT INTO orders (request_id, customer, sku, amount_cents) VALUES ($1, $2, $3, $4) RETURNING id",
        request_id, customer, sku, amount_cents,
    )
    charge_id = await payments.charge(customer, amount_cents, idempotency_key=f"order-{order_id}")
    await pool.execute("UPDATE orders SET status = 'paid', charge_id = $2 WHERE id = $1", order_id, charge_id)
    return {"order_id": order_id, "status": "paid"}


async def reserve_stock(pool: Any, event: dict[str, Any]) -> None:
    """order.paid arrives at least once: reserve the order's items once per event."""
    if await pool.fetchval("SELECT 1 FROM processed_events WHERE event_id = $1", event["event_id"]):
        return  # seen it: a redelivery
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE stock SET reserved = reserved + $2 WHERE sku = $1", event["sku"], event["qty"])
        await conn.execute("INSERT INTO processed_events (event_id) VALUES ($1)", event["event_id"])
