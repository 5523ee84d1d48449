"""Wrong: a session advisory lock on the key, taken and released through the pool.

The claim: "requests with one key are serialised by pg_advisory_lock, held until the unlock in
finally". But ``db.execute`` lends a connection and takes it back at once, and asyncpg resets a
connection that comes back (``SELECT pg_advisory_unlock_all()``): the lock is gone before the next
statement, and the unlock runs on whatever connection the pool lends next. Two requests both find no
row and both charge. Expected verdict: exit 1, key k1 charged 2 times.
"""

import json

import lab
from fixes.s1_dedup_race import fingerprint, replay


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    await db.execute("SELECT pg_advisory_lock(hashtext($1))", key)  # released with the pooled connection
    try:
        existing = await db.fetchrow(
            "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1", key
        )
        if existing is not None:
            return replay(existing, body)
        await db.execute(
            "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
            " ON CONFLICT (key) DO NOTHING",
            key, fingerprint(body),
        )
        amount = json.loads(body)["amount"]
        charge_id = await provider.charge(key, amount)
        response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
        await db.execute(
            "UPDATE idempotency_keys SET status = 'completed', response_status = $2, response_body = $3"
            " WHERE key = $1",
            key, response.status, json.dumps(response.body),
        )
        return response
    finally:
        await db.execute("SELECT pg_advisory_unlock(hashtext($1))", key)

