"""Right: the fingerprint is the body's JSON in canonical form, and the loser looks before it answers.

Another design than the lab's fix: the body is parsed and printed back with sorted keys before it
is hashed, so a client that sends the same fields in another order is the same request, while any
field that differs (amount, currency, one added or left out) is another body: 422. The claim is the
lab's INSERT ... ON CONFLICT DO NOTHING RETURNING. Expected verdict: exit 0.
"""

import hashlib
import json
from typing import Any

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    won = await db.fetchval(
        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
        " ON CONFLICT (key) DO NOTHING RETURNING true",
        key, fingerprint(body),
    )
    if not won:
        existing = await db.fetchrow(
            "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1", key
        )
        return replay(existing, body)
    amount = json.loads(body)["amount"]
    charge_id = await provider.charge(key, amount)
    currency = json.loads(body).get("currency")
    response = lab.Response(201, {"charge_id": charge_id, "amount": amount, "currency": currency})
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
    canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
