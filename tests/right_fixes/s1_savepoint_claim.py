"""Right: one transaction per request; the claim is INSERTed inside a SAVEPOINT, and losing it is recovered.

Another design than the lab's fix: the request's transaction holds its claim (uncommitted) until the
charge is recorded, so a duplicate's INSERT waits for it. When the owner commits, the duplicate's
INSERT fails on the primary key; the nested ``conn.transaction()`` is a savepoint, so only the INSERT
is rolled back and the duplicate reads the winner's row in the same, still usable, transaction and
replays it. Expected verdict: exit 0.
"""

import json

import asyncpg

import lab
from fixes.s1_dedup_race import fingerprint, replay


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    async with db.acquire() as conn, conn.transaction():
        try:
            async with conn.transaction():  # SAVEPOINT: losing the key must not end the request's transaction
                await conn.execute(
                    "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')",
                    key, fingerprint(body),
                )
        except asyncpg.UniqueViolationError:
            existing = await conn.fetchrow(
                "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1",
                key,
            )
            return replay(existing, body)
        amount = json.loads(body)["amount"]
        charge_id = await provider.charge(key, amount)
        response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
        await conn.execute(
            "UPDATE idempotency_keys SET status = 'completed', response_status = $2, response_body = $3"
            " WHERE key = $1",
            key, response.status, json.dumps(response.body),
        )
        return response

