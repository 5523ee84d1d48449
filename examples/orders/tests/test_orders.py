"""The order service under the lab's attacks: a retried POST /orders, and a redelivered order.paid."""

from collections import Counter
from types import ModuleType
from typing import Any

import pytest

EVENT = {"event_id": "evt-1", "sku": "book", "qty": 2}


async def one_paid_order_per_request(db: Any, calls: list[Any]) -> list[str]:
    """A request id makes one order, the order is paid, and no charge is left without its order."""
    anomalies = [
        f"request {row['request_id']} made {row['n']} orders"
        for row in await db.fetch("SELECT request_id, count(*) AS n FROM orders GROUP BY 1 HAVING count(*) > 1")
    ]
    anomalies += [
        f"order {row['id']} ({row['request_id']}) was never paid"
        for row in await db.fetch("SELECT id, request_id FROM orders WHERE status <> 'paid' ORDER BY id")
    ]
    charged = Counter(call.result for call in calls if call.name == "payments.charge" and call.error is None)
    recorded = {row["charge_id"] for row in await db.fetch("SELECT charge_id FROM orders")}
    anomalies += [f"{charge} took the customer's money for no order" for charge in sorted(charged.keys() - recorded)]
    return anomalies


async def reserved_once(db: Any) -> list[str]:
    """The event's 2 books are reserved exactly once, however often it was delivered."""
    reserved = await db.fetchval("SELECT reserved FROM stock WHERE sku = 'book'")
    return [] if reserved == EVENT["qty"] else [f"book reserved {reserved}, expected {EVENT['qty']}"]


@pytest.fixture
def order(orders: ModuleType, payments: Any) -> Any:
    """POST /orders as a client sends it, and sends it again when it got no answer: request id r-1."""
    return lambda db: orders.create_order(db, payments, "r-1", "ada", "book", 1500)


async def test_a_retried_order_is_made_and_charged_once(lab: Any, order: Any) -> None:
    await lab.every_interleaving(order, invariant=one_paid_order_per_request)


async def test_an_order_survives_a_crash_and_its_retry(lab: Any, order: Any) -> None:
    await lab.crash_points(order, invariant=one_paid_order_per_request)


async def test_many_retries_at_once_make_one_order(lab: Any, order: Any) -> None:
    await lab.stress(order, invariant=one_paid_order_per_request, concurrency=(2, 10), trials=20)


async def test_a_redelivered_event_reserves_once(lab: Any, orders: ModuleType) -> None:
    await lab.redelivery(orders.reserve_stock, EVENT, invariant=reserved_once)
