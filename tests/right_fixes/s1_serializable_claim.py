"""Right: SELECT-then-INSERT kept, but in a SERIALIZABLE transaction, and the charge only after it commits.

Another design than the lab's fix: the buggy handler's shape, made safe by the isolation level. Two
requests that both see no row cannot both commit their claim: PostgreSQL aborts one with a
serialization failure (or, if it already waits on the other's key, a unique violation). The loser
reads the row the winner committed and answers 409 or replays. The provider is called only once the
claim has committed, so a rolled-back claim never has a charge behind it. Expected verdict: exit 0.
"""

import hashlib
import json
from typing import Any

import asyncpg

import lab

SELECT = "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1"


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    async with db.acquire() as conn:
        try:
            async with conn.transaction(isolation="serializable"):
                existing = await conn.fetchrow(SELECT, key)
                if existing is None:
                    await conn.execute(
                        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')",
                        key, fingerprint(body),
                    )
        except (asyncpg.SerializationError, asyncpg.UniqueViolationError):
            existing = await conn.fetchrow(SELECT, key)  # the winner's claim, committed
            if existing is None:
                return lab.Response(409, {"error": "a request with this key is in progress"})
        if existing is not None:
            return replay(existing, body)
        amount = json.loads(body)["amount"]
        charge_id = await provider.charge(key, amount)  # only after our claim committed
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
