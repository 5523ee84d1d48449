"""Scenario 3: the lost transition (snippet 3, ported from SQL).

Claim: a request that finds its key in_progress calls the payment provider anyway, then UPDATEs the
row to completed without asking which state it is leaving. The original request T1 holds k1 and is
slow; its client retries, and the retry T2 reads in_progress, charges again, and its UPDATE waits
for T1's row lock only to overwrite T1's completion when it gets it: the last UPDATE wins.

Expected: key k1 charged 2 times, and T1's client was answered ch_1 while ch_2 is stored for replay.
"""

import hashlib
import json
from typing import Any

import lab

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
    await db.execute(  # the key is created atomically (scenario 1's lesson); from here on, snippet 3
        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
        " ON CONFLICT (key) DO NOTHING",
        key, fingerprint(body),
    )
    async with db.acquire() as conn, conn.transaction():
        existing = await conn.fetchrow(
            "SELECT status, response_status, response_body FROM idempotency_keys WHERE key = $1", key
        )  # reads 'in_progress'
        assert existing is not None  # inserted above; keys are never deleted
        if existing["status"] == "completed":
            return replay(existing)
        # application sees in_progress, calls the payment provider anyway...
        amount = json.loads(body)["amount"]
        charge_id = await provider.charge(key, amount)
        # provider succeeds, then:
        response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
        await conn.execute(
            "UPDATE idempotency_keys SET status = 'completed', response_status = $2, response_body = $3"
            " WHERE key = $1",
            key, response.status, json.dumps(response.body),
        )
    return response


def replay(existing: Any) -> lab.Response:
    return lab.Response(existing["response_status"], json.loads(existing["response_body"]))


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


# The race, step by step (read it like a Hermitage test: who moves, and what they see).
CANONICAL = lab.Schedule.of(
    ("T1", "INSERT: the original request creates k1, in_progress"),
    ("T1", "BEGIN"),
    ("T2", "the client gave up waiting and retries: INSERT does nothing, k1 exists"),
    ("T2", "BEGIN"),
    ("T2", "SELECT status: reads 'in_progress'"),
    ("T1", "SELECT status: in_progress too (its own row, but nothing says so)"),
    ("T1", "provider.charge: the original charge, ch_1"),
    ("T2", "provider.charge anyway: the duplicate charge, ch_2"),
    ("T1", "UPDATE k1 completed with ch_1"),
    ("T2", "UPDATE k1 completed with ch_2: waits for T1's row lock"),
    ("T1", "COMMIT: T1's client is answered ch_1; T2's UPDATE goes through"),
    ("T2", "COMMIT: the last UPDATE wins, ch_2 is what k1 replays"),
)

INVARIANT = lab.called_once_and_answered_as_stored

# The crash attack: T1 crashes at each of its step boundaries; its client retries a minute later.
CRASH = lab.CrashAttack(retry_after=60, invariant=lab.charged_once_after_recovery)
