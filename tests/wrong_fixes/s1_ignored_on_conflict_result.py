"""Wrong: the INSERT became ON CONFLICT DO NOTHING, but nobody looks at what it returned.

The claim: "the insert is atomic now, so no more duplicate-key error". True, and that is the whole
problem: the losing INSERT reports ``INSERT 0 0`` instead of failing, and the handler charges anyway.
The smallest possible diff from the buggy handler. Expected verdict: exit 1, key k1 charged 2 times.
"""

import hashlib
import json
from typing import Any

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    existing = await db.fetchrow(
        "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1", key
    )
    if existing is not None:
        return replay(existing, body)
    await db.execute(  # returns "INSERT 0 0" when another request got there first: ignored
        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
        " ON CONFLICT (key) DO NOTHING",
        key, fingerprint(body),
    )
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
