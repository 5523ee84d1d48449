"""Wrong: the INSERT's error is no longer ignored; it is not handled either.

The claim: "the primary key stops the second request". It does, by raising: the losing request's
UniqueViolationError escapes the handler, and its client gets a 500 for a payment that succeeded,
then retries into another 500. Nobody is charged twice, yet nobody who retries is answered.
Expected verdict: exit 1, T2 raised UniqueViolationError.
"""

import hashlib
import json

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    await db.execute(  # the loser raises UniqueViolationError here, and nothing catches it
        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')",
        key, hashlib.sha256(body).hexdigest(),
    )
    amount = json.loads(body)["amount"]
    charge_id = await provider.charge(key, amount)
    response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
    await db.execute(
        "UPDATE idempotency_keys SET status = 'completed', response_status = $2, response_body = $3 WHERE key = $1",
        key, response.status, json.dumps(response.body),
    )
    return response
