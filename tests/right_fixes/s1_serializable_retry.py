"""Right: the buggy handler's SELECT-then-INSERT as a SERIALIZABLE transaction, retried on serialization failure.

Another design than the lab's fix: the claim is checked and made in one SERIALIZABLE transaction,
where two requests that both find no row cannot both commit. PostgreSQL aborts the loser with a
serialization failure (40001), or, when its INSERT waited on the winner's key, a unique violation
(23505), which PostgreSQL's manual advises retrying too under SERIALIZABLE. The handler then runs
the transaction again: its new snapshot sees the winner's row, so it answers 409 or replays. The
provider is called only after the claim committed, outside any transaction that could be retried,
so a retry never charges twice. Expected verdict: exit 0.
"""

import hashlib
import json
from typing import Any

import asyncpg

import lab

ATTEMPTS = 5  # then the error reaches the client as a 500, which it may retry with the same key
RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError, asyncpg.UniqueViolationError)
SELECT = "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1"


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    async with db.acquire() as conn:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                existing = await claim(conn, key, body)
                break
            except RETRYABLE:
                if attempt == ATTEMPTS:
                    raise
        if existing is not None:
            return replay(existing, body)
        amount = json.loads(body)["amount"]
        charge_id = await provider.charge(key, amount)  # only after our claim committed: never retried
        response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
        await conn.execute(
            "UPDATE idempotency_keys SET status = 'completed', response_status = $2, response_body = $3"
            " WHERE key = $1",
            key, response.status, json.dumps(response.body),
        )
        return response


async def claim(conn: Any, key: str, body: bytes) -> Any:
    """The key's row if another request has it; None once this request's claim has committed."""
    async with conn.transaction(isolation="serializable"):
        existing = await conn.fetchrow(SELECT, key)
        if existing is None:
            await conn.execute(
                "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')",
                key, fingerprint(body),
            )
        return existing


def replay(existing: Any, body: bytes) -> lab.Response:
    if existing["fingerprint"] != fingerprint(body):
        return lab.Response(422, {"error": "key reused with a different request body"})
    if existing["status"] != "completed":
        return lab.Response(409, {"error": "a request with this key is in progress"})
    return lab.Response(existing["response_status"], json.loads(existing["response_body"]))


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
