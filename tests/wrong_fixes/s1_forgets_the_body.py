"""Wrong: the claim is atomic and replays are exact, but the request body is never compared.

The claim: "the key identifies the request". A client that reuses a key for a different purchase
(5000 cents instead of 1000) is told its 5000 were charged, with the 1000-cent charge's response.
The draft answers 422. Expected verdict: exit 1, the different body got a success.
"""

import json

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    won = await db.fetchrow(
        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, '', 'in_progress')"
        " ON CONFLICT (key) DO NOTHING RETURNING key",
        key,
    )
    if won is None:
        existing = await db.fetchrow(
            "SELECT response_status, response_body, status FROM idempotency_keys WHERE key = $1", key
        )
        if existing is None or existing["status"] != "completed":
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
