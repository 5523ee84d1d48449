"""Wrong: an advisory lock on the key, released as soon as the check is done.

The claim: "requests with the same key are serialised by pg_advisory_lock". They are, but only for
the SELECT: the lock is let go before the INSERT and the charge, so two requests can each check
under the lock, find no row, and both go on. Expected verdict: exit 1, key k1 charged 2 times.
"""

import hashlib
import json
from typing import Any

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    async with db.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", key)
        existing = await conn.fetchrow(
            "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1", key
        )
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)  # too early: nothing claimed yet
        if existing is not None:
            return replay(existing, body)
        await conn.execute(
            "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
            " ON CONFLICT (key) DO NOTHING",
            key, fingerprint(body),
        )
        amount = json.loads(body)["amount"]
        charge_id = await provider.charge(key, amount)
        response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
        await conn.execute(
            "UPDATE idempotency_keys SET status = 'completed', response_status = $2, response_body = $3"
            " WHERE key = $1",
            key, response.status, json.dumps(response.body),
        )
        return response


def replay(existing: Any, body: bytes) -> lab.Response:
    if existing["fingerprint"] != fingerprint(body):
        return lab.Response(422, {"error": "key reused with a different request body"})
    if existing["status"] != "completed":
        return lab.Response(409, {"error": "a request with this key is in progress"})
    return lab.Response(existing["response_status"], json.loads(existing["response_body"]))


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
