"""Wrong: a failed payment is stored as the key's final answer, and replayed for ever.

The claim: "a completed or failed key replays what it stores, as the draft says". The draft stores
a response for the key once the server has *finished* with it; a 502 from the provider is not a
decision about the payment, it is the provider being down. Every retry is told 502 and nothing is
ever charged. Scenario 3: failed -> in_progress on retry. Expected verdict: exit 1, charged 0 times.
"""

import hashlib
import json
import math
from datetime import timedelta
from typing import Any

import lab

LEASE_SECONDS = 30


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    if not 0 < len(key) <= 255:
        return lab.Response(400, {"error": "Idempotency-Key must be 1 to 255 characters"})
    if amount_of(body) is None:
        return lab.Response(400, {"error": "body must be a JSON object with a positive integer amount"})
    now = lab.clock.now()
    claim = await db.fetchrow(
        "INSERT INTO idempotency_keys AS k (key, fingerprint, status, lease_until) VALUES ($1, $2, 'in_progress', $3)"
        " ON CONFLICT (key) DO UPDATE SET status = 'in_progress', lease_until = $3, attempt = k.attempt + 1"
        " WHERE k.fingerprint = $2 AND (k.status = 'in_progress' AND k.lease_until <= $4)"
        " RETURNING attempt",
        key, fingerprint(body), now + timedelta(seconds=LEASE_SECONDS), now,
    )
    if claim is None:
        return await replay(db, key, body)
    return await process(db, provider, key, body, claim["attempt"])


async def process(db: lab.Db, provider: lab.Provider, key: str, body: bytes, attempt: int) -> lab.Response:
    amount = json.loads(body)["amount"]
    try:
        charge_id = await provider.charge(key, amount, idempotency_key=key)
    except (lab.ProviderError, TimeoutError):
        failed = lab.Response(502, {"error": "the payment provider failed; retry with the same key"})
        return await finish(db, key, body, attempt, "failed", failed)
    response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
    return await finish(db, key, body, attempt, "completed", response)


async def finish(db: lab.Db, key: str, body: bytes, attempt: int, status: str, response: lab.Response) -> lab.Response:
    moved = await db.execute(
        "UPDATE idempotency_keys SET status = $3, response_status = $4, response_body = $5, lease_until = NULL"
        " WHERE key = $1 AND status = 'in_progress' AND attempt = $2",
        key, attempt, status, response.status, json.dumps(response.body),
    )
    if moved != "UPDATE 1":
        return await replay(db, key, body)
    return response


async def replay(db: lab.Db, key: str, body: bytes) -> lab.Response:
    existing: Any = await db.fetchrow(
        "SELECT fingerprint, status, response_status, response_body, lease_until FROM idempotency_keys WHERE key = $1",
        key,
    )
    if existing["fingerprint"] != fingerprint(body):
        return lab.Response(422, {"error": "key reused with a different request body"})
    if existing["status"] in ("completed", "failed"):
        return lab.Response(existing["response_status"], json.loads(existing["response_body"]))
    left = ((existing["lease_until"] or lab.clock.now()) - lab.clock.now()).total_seconds()
    retry_after = max(1, math.ceil(left))
    return lab.Response(409, {"error": "a request with this key is in progress", "retry_after": retry_after})


def amount_of(body: bytes) -> int | None:
    try:
        amount = json.loads(body).get("amount")
    except (ValueError, AttributeError):
        return None
    return amount if type(amount) is int and amount > 0 else None


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
