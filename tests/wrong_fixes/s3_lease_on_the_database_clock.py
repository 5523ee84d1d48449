"""Wrong: the lab's state machine with its lease on the database's clock, now(), as in production.

The claim: "never trust the application server's clock: let PostgreSQL stamp and compare the
lease". In production, yes. In the lab, time is the lab's clock, ``lab.clock.now()``: it is what the
lab moves when a client waits out a Retry-After, or a minute passes after a crash, and it makes every
replay of a schedule exact. The database's now() barely moves during a check, so a dead owner's lease
never runs out: the client waits what each 409 said, retries, and is told 409 again. Expected
verdict: exit 1, the key is stuck, and the verdict names lab.clock.now().
"""

import hashlib
import json
from typing import Any

import lab

LEASE = "30 seconds"


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    if not 0 < len(key) <= 255:
        return lab.Response(400, {"error": "Idempotency-Key must be 1 to 255 characters"})
    if amount_of(body) is None:
        return lab.Response(400, {"error": "body must be a JSON object with a positive integer amount"})
    claim = await db.fetchrow(
        "INSERT INTO idempotency_keys AS k (key, fingerprint, status, lease_until)"
        f" VALUES ($1, $2, 'in_progress', now() + interval '{LEASE}')"
        f" ON CONFLICT (key) DO UPDATE SET status = 'in_progress', lease_until = now() + interval '{LEASE}',"
        " attempt = k.attempt + 1"
        " WHERE k.fingerprint = $2 AND (k.status = 'failed' OR (k.status = 'in_progress' AND k.lease_until <= now()))"
        " RETURNING attempt",
        key, fingerprint(body),
    )
    if claim is None:
        return await replay(db, key, body)
    amount = json.loads(body)["amount"]
    try:
        charge_id = await provider.charge(key, amount, idempotency_key=key)
    except (lab.ProviderError, TimeoutError):
        return await finish(db, key, body, claim["attempt"], "failed",
                            lab.Response(502, {"error": "the payment provider failed; retry with the same key"}))
    return await finish(db, key, body, claim["attempt"], "completed",
                        lab.Response(201, {"charge_id": charge_id, "amount": amount}))


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
        "SELECT fingerprint, status, response_status, response_body,"
        " ceil(extract(epoch FROM lease_until - now()))::int AS left FROM idempotency_keys WHERE key = $1",
        key,
    )
    if existing["fingerprint"] != fingerprint(body):
        return lab.Response(422, {"error": "key reused with a different request body"})
    if existing["status"] == "completed":
        return lab.Response(existing["response_status"], json.loads(existing["response_body"]))
    retry_after = max(1, existing["left"] or 0)
    return lab.Response(409, {"error": "a request with this key is in progress", "retry_after": retry_after})


def amount_of(body: bytes) -> int | None:
    try:
        amount = json.loads(body).get("amount")
    except (ValueError, AttributeError):
        return None
    return amount if type(amount) is int and amount > 0 else None


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
