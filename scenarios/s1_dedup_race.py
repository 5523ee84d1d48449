"""Scenario 1: the dedup race (snippet 1, ported from Go).

Claim: the handler checks for the key with a SELECT and creates it with a separate INSERT. Two
requests with one Idempotency-Key that arrive together both find no row; the second INSERT fails on
the primary key and, as in the original, that error is ignored, so both go on to charge the card.

Expected: key k1 charged 2 times.
"""

import hashlib
import json
from typing import Any

import asyncpg

import lab

SCHEMA = """
CREATE TABLE idempotency_keys (
    key             text PRIMARY KEY,
    fingerprint     text NOT NULL,
    status          text NOT NULL,       -- in_progress | completed
    response_status int,
    response_body   jsonb
);
"""


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    existing = await db.fetchrow("SELECT response_body, status FROM idempotency_keys WHERE key = $1", key)
    if existing is None:
        # no row yet -> treat as new
        try:
            await db.execute(
                "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')",
                key, fingerprint(body),
            )
        except asyncpg.PostgresError:
            pass  # the Go original never looks at ExecContext's error
        return await process(db, provider, key, body)  # runs the charge
    return replay(existing)


async def process(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    amount = json.loads(body)["amount"]
    charge_id = await provider.charge(key, amount)
    response = lab.Response(201, {"charge_id": charge_id, "amount": amount})
    await db.execute(
        "UPDATE idempotency_keys SET status = 'completed', response_status = $2, response_body = $3"
        " WHERE key = $1",
        key, response.status, json.dumps(response.body),
    )
    return response


def replay(existing: Any) -> lab.Response:
    body = json.loads(existing["response_body"]) if existing["response_body"] else {"status": existing["status"]}
    return lab.Response(200, body)


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


# The race, step by step (read it like a Hermitage test: who moves, and what they see).
CANONICAL = lab.Schedule.of(
    ("T1", "SELECT: no row for k1"),
    ("T2", "SELECT: no row either, T1 has not inserted yet"),
    ("T1", "INSERT k1 in_progress"),
    ("T2", "INSERT fails: duplicate key; the error is ignored"),
    ("T1", "provider.charge: the first charge"),
    ("T2", "provider.charge: the duplicate charge"),
    ("T1", "UPDATE k1 completed"),
    ("T2", "UPDATE k1 completed, overwriting T1's response"),
)

INVARIANT = lab.at_most_one_provider_call_per_key
