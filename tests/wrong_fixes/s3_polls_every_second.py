"""Wrong: the lab's state machine, but a 409 always says "retry after 1 second", so clients poll.

The claim: "a short Retry-After makes clients come back soon, and the lease still protects the key".
It does, but Retry-After is a promise: a client that waits what it was told and retries is turned
away again, and again, for the whole 30 s lease of an owner that died. The lab's client honours
each Retry-After, three times, and is still told 409: the key looks stuck. Say when the lease runs
out. Expected verdict: exit 1, Retry-After is a promise.
"""

import hashlib
import json
from datetime import timedelta
from typing import Any

import lab

LEASE_SECONDS = 30  # how long an owner may hold a key in_progress before a retry may take it over

SCHEMA = """
CREATE TABLE idempotency_keys (
    key             text PRIMARY KEY,
    fingerprint     text NOT NULL,
    status          text NOT NULL CHECK (status IN ('in_progress', 'completed', 'failed')),
    response_status int,
    response_body   jsonb,
    lease_until     timestamptz,             -- in_progress: until when its owner holds the key
    attempt         int NOT NULL DEFAULT 1   -- which claim holds the key: the owner's fencing token
);
"""


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    if not 0 < len(key) <= 255:  # refused before anything is stored or charged
        return lab.Response(400, {"error": "Idempotency-Key must be 1 to 255 characters"})
    if amount_of(body) is None:
        return lab.Response(400, {"error": "body must be a JSON object with a positive integer amount"})
    now = lab.clock.now()  # the lab's clock, so that replays never depend on wall time (in production: now())
    claim = await db.fetchrow(  # absent, failed, or in_progress past its lease -> in_progress: one winner
        "INSERT INTO idempotency_keys AS k (key, fingerprint, status, lease_until) VALUES ($1, $2, 'in_progress', $3)"
        " ON CONFLICT (key) DO UPDATE SET status = 'in_progress', lease_until = $3, attempt = k.attempt + 1"
        " WHERE k.fingerprint = $2 AND (k.status = 'failed' OR (k.status = 'in_progress' AND k.lease_until <= $4))"
        " RETURNING attempt",
        key, fingerprint(body), now + timedelta(seconds=LEASE_SECONDS), now,
    )
    if claim is None:
        return await replay(db, key, body)  # completed, a live lease, or another body: never the provider
    return await process(db, provider, key, body, claim["attempt"])


async def process(db: lab.Db, provider: lab.Provider, key: str, body: bytes, attempt: int) -> lab.Response:
    amount = json.loads(body)["amount"]
    try:  # the request's key goes to the provider too: a charge a crashed owner made is not made twice
        charge_id = await provider.charge(key, amount, idempotency_key=key)
    except (lab.ProviderError, TimeoutError):  # -> failed: the client's next retry may take the key over
        failed = lab.Response(502, {"error": "the payment provider failed; retry with the same key"})
        return await finish(db, key, body, attempt, "failed", failed)
    response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
    return await finish(db, key, body, attempt, "completed", response)


async def finish(
    db: lab.Db, key: str, body: bytes, attempt: int, status: str, response: lab.Response
) -> lab.Response:
    moved = await db.execute(  # in_progress -> completed | failed, only while this attempt holds the key
        "UPDATE idempotency_keys SET status = $3, response_status = $4, response_body = $5, lease_until = NULL"
        " WHERE key = $1 AND status = 'in_progress' AND attempt = $2",
        key, attempt, status, response.status, json.dumps(response.body),
    )
    if moved != "UPDATE 1":  # our lease ran out and a retry took the key over: the row is its to write
        return await replay(db, key, body)
    return response


async def replay(db: lab.Db, key: str, body: bytes) -> lab.Response:
    existing: Any = await db.fetchrow(  # the row exists: it was inserted or found above, never deleted
        "SELECT fingerprint, status, response_status, response_body, lease_until FROM idempotency_keys"
        " WHERE key = $1", key,
    )
    if existing["fingerprint"] != fingerprint(body):
        return lab.Response(422, {"error": "key reused with a different request body"})
    if existing["status"] == "completed":
        return lab.Response(existing["response_status"], json.loads(existing["response_body"]))
    retry_after = 1  # "poll every second": not when the lease runs out
    return lab.Response(409, {"error": "a request with this key is in progress", "retry_after": retry_after})


def amount_of(body: bytes) -> int | None:
    try:
        amount = json.loads(body).get("amount")
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        return None
    return amount if type(amount) is int and amount > 0 else None


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
