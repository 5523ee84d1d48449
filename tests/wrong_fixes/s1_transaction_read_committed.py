"""Wrong: SELECT-then-INSERT wrapped in a transaction at READ COMMITTED, the default.

The claim: "a transaction makes check-then-insert atomic". Not at READ COMMITTED: both requests'
SELECTs see no row. The second INSERT waits for the first transaction, then fails on the key; the
error is ignored as in the original, the aborted transaction's COMMIT quietly rolls back, and the
handler charges. Expected verdict: exit 1, key k1 charged 2 times.
"""

import contextlib
import hashlib
import json
from typing import Any

import asyncpg

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    async with db.acquire() as conn:
        async with conn.transaction():
            existing = await conn.fetchrow(
                "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1",
                key,
            )
            if existing is None:
                with contextlib.suppress(asyncpg.UniqueViolationError):  # kept from the original
                    await conn.execute(
                        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')",
                        key, fingerprint(body),
                    )
        if existing is not None:
            return replay(existing, body)
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
