"""Right: INSERT ... ON CONFLICT DO UPDATE ... RETURNING (xmax = 0), which says whether this request inserted.

Another design than the lab's fix: the upsert always returns the key's row, and PostgreSQL's system
column xmax is 0 on a row this statement inserted, the lock-holder's id on one it updated. Only the
request that inserted charges; the others read the row the upsert returned. The no-op DO UPDATE
also locks the row, so a loser waits for the winner's statement and never reads a half-made key.
A new charge is answered 200, not 201: the contract asks for a success, not a particular one.
Expected verdict: exit 0.
"""

import hashlib
import json
from typing import Any

import lab


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    row: Any = await db.fetchrow(
        "INSERT INTO idempotency_keys AS k (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
        " ON CONFLICT (key) DO UPDATE SET key = k.key"
        " RETURNING (xmax = 0) AS inserted, fingerprint, status, response_status, response_body",
        key, fingerprint(body),
    )
    if not row["inserted"]:
        return replay(row, body)
    amount = json.loads(body)["amount"]
    charge_id = await provider.charge(key, amount)
    response = lab.Response(200, {"charge_id": charge_id, "amount": amount})
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
