"""Wrong: the claim is atomic, but a duplicate in flight is told 200 with the row's status.

The claim: "the loser returns whatever the key's row says". It never charges twice, yet a client
whose first request is still in flight gets a 200 with no charge in it, believes it has paid, and
moves on. The draft says 409 until the first request completes. Expected verdict: exit 1, a
duplicate answered a success different from the stored response.
"""

import hashlib
import json
from typing import Any

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    won = await db.fetchrow(
        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
        " ON CONFLICT (key) DO NOTHING RETURNING key",
        key, fingerprint(body),
    )
    if won is None:
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
        return lab.Response(200, {"status": existing["status"]})  # should be 409
    return lab.Response(existing["response_status"], json.loads(existing["response_body"]))


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
