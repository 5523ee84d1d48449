"""Right: claim, charge and completion in one transaction, so a duplicate waits and replays.

Another design than the lab's fix: the claim's INSERT stays uncommitted while the provider is
called, so a duplicate's INSERT ... ON CONFLICT waits on it; when the winner commits, the duplicate
finds the key completed and replays it. No duplicate ever sees the key in flight (so none is told
409), at the price of a transaction held open across the provider call. Expected verdict: exit 0.
"""

import hashlib
import json
from typing import Any

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    async with db.acquire() as conn, conn.transaction():
        won = await conn.fetchrow(
            "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
            " ON CONFLICT (key) DO NOTHING RETURNING key",
            key, fingerprint(body),
        )
        if won is None:  # the winner has committed by now: its row is complete
            existing = await conn.fetchrow(
                "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1",
                key,
            )
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
