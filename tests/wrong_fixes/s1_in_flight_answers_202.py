"""Wrong: a duplicate in flight is told 202 Accepted, "we are on it", instead of 409.

The claim: "the first request will finish, so the retry is accepted too". It never charges twice,
but 202 is a success a client may act on (and a status the draft does not give a retry): it says
the request was taken, while the client's own request was turned away and will never be answered
with a charge. The draft answers 409 until the first request completes. Expected verdict: exit 1,
a duplicate in flight answered 202.
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
        return lab.Response(202, {"status": "accepted, in progress"})  # should be 409
    return lab.Response(existing["response_status"], json.loads(existing["response_body"]))


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
