"""Wrong: SELECT-then-INSERT in a SERIALIZABLE transaction, and nothing done about serialization failures.

The claim: "SERIALIZABLE makes check-then-insert safe". It does keep the key from being claimed
twice: of two requests that both find no row, PostgreSQL lets only one commit. The other gets a
serialization failure (40001) or a unique violation, which this handler lets escape, so its client
is answered 500 for a request that was simply a duplicate. SERIALIZABLE needs a retry to be a fix
(tests/right_fixes/s1_serializable_retry.py). Expected verdict: exit 1, a client answered 500.
"""

import hashlib
import json
from typing import Any

import lab

SELECT = "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1"


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    async with db.acquire() as conn:
        async with conn.transaction(isolation="serializable"):
            existing = await conn.fetchrow(SELECT, key)
            if existing is None:
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
