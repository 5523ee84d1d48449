"""Scenario 1: the dedup race, fixed.

Claim: creating the key is one atomic statement, INSERT ... ON CONFLICT (key) DO NOTHING RETURNING.
Exactly one request gets a row back and processes; every other one reads the row it lost to and
replays the stored response, or answers 409 while the winner is still in flight.

Expected: key k1 charged once, whatever the interleaving.
"""

import hashlib
import json
from typing import Any

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
    won = await db.fetchrow(
        "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')"
        " ON CONFLICT (key) DO NOTHING RETURNING key",
        key, fingerprint(body),
    )
    if won is not None:
        return await process(db, provider, key, body)  # runs the charge: only the winner gets here
    existing = await db.fetchrow(
        "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1", key
    )
    return replay(existing, body)


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


def replay(existing: Any, body: bytes) -> lab.Response:
    if existing["fingerprint"] != fingerprint(body):
        return lab.Response(422, {"error": "key reused with a different request body"})
    if existing["status"] != "completed":
        return lab.Response(409, {"error": "a request with this key is in progress"})
    return lab.Response(existing["response_status"], json.loads(existing["response_body"]))


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


# The same race, turn for turn; a turn a finished session cannot take is skipped.
CANONICAL = lab.Schedule.of(
    ("T1", "INSERT ... ON CONFLICT DO NOTHING RETURNING: T1 wins k1"),
    ("T2", "INSERT ... ON CONFLICT DO NOTHING RETURNING: no row, T2 lost"),
    ("T1", "provider.charge: the only charge"),
    ("T2", "SELECT: k1 is in_progress, T2 answers 409"),
    ("T1", "UPDATE k1 completed"),
    ("T2", "(T2 has answered: turn skipped)"),
    ("T1", "(T1 has answered: turn skipped)"),
    ("T2", "(turn skipped)"),
)

INVARIANT = lab.at_most_one_provider_call_per_key
