"""Wrong: a failed or expired key is taken over after a SELECT said so, by an UPDATE that does not check it.

The claim: "the SELECT shows the key is failed, so this request takes it over; the attempt fences
the old owner". It does fence the old owner. But two retries of a failed key both read 'failed' and
both take it over (the second UPDATE waits for the first, then updates again): two owners, two calls
to the provider for one key. A takeover is one compare-and-set (WHERE status = 'failed' ...) whose
row count says who won. Expected verdict: exit 1, two retries both took the failed key over.
"""

import hashlib
import json
import math
from datetime import timedelta
from typing import Any

import lab

LEASE_SECONDS = 30
SELECT = "SELECT fingerprint, status, response_status, response_body, lease_until, attempt FROM idempotency_keys"


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
        row: Any = await db.fetchrow(SELECT + " WHERE key = $1", key)
        free = row["status"] == "failed" or (row["status"] == "in_progress" and row["lease_until"] <= now)
        if row["fingerprint"] != fingerprint(body) or not free:
            return answer(row, body)
        attempt = await db.fetchval(  # decided above, on a read another retry may have made too
            "UPDATE idempotency_keys SET status = 'in_progress', lease_until = $2, attempt = attempt + 1"
            " WHERE key = $1 RETURNING attempt",
            key, lease,
        )
    try:
        charge_id = await provider.charge(key, json.loads(body)["amount"], idempotency_key=key)
        response = lab.Response(201, {"charge_id": charge_id, "amount": json.loads(body)["amount"]})
        status = "completed"
    except (lab.ProviderError, TimeoutError):
        response = lab.Response(502, {"error": "the payment provider failed; retry with the same key"})
        status = "failed"
    moved = await db.execute(
        "UPDATE idempotency_keys SET status = $3, response_status = $4, response_body = $5, lease_until = NULL"
        " WHERE key = $1 AND status = 'in_progress' AND attempt = $2",
        key, attempt, status, response.status, json.dumps(response.body),
    )
    if moved != "UPDATE 1":
        return answer(await db.fetchrow(SELECT + " WHERE key = $1", key), body)
    return response


def answer(row: Any, body: bytes) -> lab.Response:
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
