"""Wrong: the key decides who charges, but the stored response is looked up by the request's body.

The claim: "a retry carries the same body, so its fingerprint finds the response to replay, and no
fingerprint match means another body: 422". Right for one customer. Two purchases with the same
body under two keys (the same basket, bought twice) share a fingerprint, and a retry of the second
is answered with the first one's charge. Every lookup of a key's row says WHERE key = $1.
Expected verdict: exit 1, key k2 answered with the charge made for key k1.
"""

import hashlib
import json

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    won = await db.fetchrow(
        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
        " ON CONFLICT (key) DO NOTHING RETURNING key",
        key, fingerprint(body),
    )
    if won is None:
        existing = await db.fetchrow(  # by body, not by key: any key with this body will do
            "SELECT response_status, response_body, status FROM idempotency_keys WHERE fingerprint = $1",
            fingerprint(body),
        )
        if existing is None:
            return lab.Response(422, {"error": "key reused with a different request body"})
        if existing["status"] != "completed":
            return lab.Response(409, {"error": "a request with this key is in progress"})
        return lab.Response(existing["response_status"], json.loads(existing["response_body"]))
    amount = json.loads(body)["amount"]
    charge_id = await provider.charge(key, amount)
    response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
    await db.execute(
        "UPDATE idempotency_keys SET status = 'completed', response_status = $2, response_body = $3 WHERE key = $1",
        key, response.status, json.dumps(response.body),
    )
    return response


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
