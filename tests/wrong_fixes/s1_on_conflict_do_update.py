"""Wrong: INSERT ... ON CONFLICT DO UPDATE ... RETURNING, to "always get the row back".

The claim: "RETURNING tells the winner it won". DO UPDATE returns the row to the loser too (it was
just updated), so every request believes it won and charges. Expected verdict: exit 1, key k1
charged 2 times.
"""

import hashlib
import json

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    won = await db.fetchrow(
        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
        " ON CONFLICT (key) DO UPDATE SET status = 'in_progress' RETURNING key",  # a row for the loser too
        key, fingerprint(body),
    )
    if won is None:
        return lab.Response(409, {"error": "a request with this key is in progress"})
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
