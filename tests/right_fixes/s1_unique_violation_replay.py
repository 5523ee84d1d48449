"""Right: INSERT the claim first; the primary key's UniqueViolation means "you lost", so replay.

Another design than the lab's fix: no SELECT before, no ON CONFLICT; the key's uniqueness does the
deciding and the handler looks at the error instead of ignoring it, as the Go original should have.
A losing INSERT waits for the winner's statement, fails, and the loser answers from the row the
winner wrote. Expected verdict: exit 0.
"""

import hashlib
import json
from typing import Any

import asyncpg

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    try:
        await db.execute(
            "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')",
            key, fingerprint(body),
        )
    except asyncpg.UniqueViolationError:  # somebody else owns the key: answer from their row
        existing = await db.fetchrow(
            "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1", key
        )
        return replay(existing, body)
    amount = json.loads(body)["amount"]
    charge_id = await provider.charge(key, amount)
    response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
    await db.execute(
        "UPDATE idempotency_keys SET status = 'completed', response_status = $2, response_body = $3 WHERE key = $1",
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
