"""Right: the claim in two statements, each a compare-and-set whose result says who won.

Another design than the lab's single upsert: INSERT ... ON CONFLICT DO NOTHING RETURNING claims an
absent key; if it returns nothing, UPDATE ... WHERE <failed, or in_progress past its lease, and the
same body> RETURNING attempt takes the key over, and only the request that got a row back owns it.
Two retries of a failed key both try the UPDATE; the second waits for the first, re-reads the row,
finds it in_progress under a live lease, and updates nothing. Expected verdict: exit 0.
"""

import hashlib
import json
import math
from datetime import timedelta
from typing import Any

import lab

LEASE_SECONDS = 30


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    if not 0 < len(key) <= 255 or amount_of(body) is None:
        return lab.Response(400, {"error": "a 1 to 255 character key and a positive integer amount, please"})
    now = lab.clock.now()
    lease = now + timedelta(seconds=LEASE_SECONDS)
    attempt = await db.fetchval(
        "INSERT INTO idempotency_keys (key, fingerprint, status, lease_until) VALUES ($1, $2, 'in_progress', $3)"
        " ON CONFLICT (key) DO NOTHING RETURNING attempt",
        key, fingerprint(body), lease,
    )
    if attempt is None:
        attempt = await db.fetchval(
            "UPDATE idempotency_keys SET status = 'in_progress', lease_until = $3, attempt = attempt + 1"
            " WHERE key = $1 AND fingerprint = $2"
            " AND (status = 'failed' OR (status = 'in_progress' AND lease_until <= $4)) RETURNING attempt",
            key, fingerprint(body), lease, now,
        )
    if attempt is None:
        return await answer(db, key, body)
    amount = json.loads(body)["amount"]
    try:
        charge_id = await provider.charge(key, amount, idempotency_key=key)
        response, status = lab.Response(201, {"charge_id": charge_id, "amount": amount}), "completed"
    except (lab.ProviderError, TimeoutError):
        response, status = lab.Response(503, {"error": "the payment provider failed; retry"}), "failed"
    moved = await db.execute(
        "UPDATE idempotency_keys SET status = $3, response_status = $4, response_body = $5, lease_until = NULL"
        " WHERE key = $1 AND attempt = $2 AND status = 'in_progress'",
        key, attempt, status, response.status, json.dumps(response.body),
    )
    return response if moved == "UPDATE 1" else await answer(db, key, body)


async def answer(db: lab.Db, key: str, body: bytes) -> lab.Response:
    row: Any = await db.fetchrow(
        "SELECT fingerprint, status, response_status, response_body, lease_until FROM idempotency_keys"
        " WHERE key = $1", key,
    )
    if row["fingerprint"] != fingerprint(body):
        return lab.Response(422, {"error": "key reused with a different request body"})
    if row["status"] == "completed":
        return lab.Response(row["response_status"], json.loads(row["response_body"]))
    left = ((row["lease_until"] or lab.clock.now()) - lab.clock.now()).total_seconds()
    return lab.Response(409, {"error": "in progress", "retry_after": max(1, math.ceil(left))})


def amount_of(body: bytes) -> int | None:
    try:
        amount = json.loads(body).get("amount")
    except (ValueError, AttributeError):
        return None
    return amount if type(amount) is int and amount > 0 else None


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
