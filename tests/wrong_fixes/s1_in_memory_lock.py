"""Wrong: a set of keys in flight, kept in the process's memory.

The claim: "a request checks the set before it touches the database, so the second one gets 409".
It does on one server, but requests with one key are retried against whichever server the load
balancer picks; the grader runs every request in its own copy of the module, and the set of one is
not the set of another. Expected verdict: exit 1, key k1 charged 2 times.
"""

import contextlib
import hashlib
import json
from typing import Any

import asyncpg

import lab

_in_flight: set[str] = set()  # one per process: a second replica has its own


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    if key in _in_flight:
        return lab.Response(409, {"error": "a request with this key is in progress"})
    _in_flight.add(key)
    try:
        existing = await db.fetchrow(
            "SELECT response_status, response_body, status, fingerprint FROM idempotency_keys WHERE key = $1", key
        )
        if existing is not None:
            return replay(existing, body)
        with contextlib.suppress(asyncpg.UniqueViolationError):
            await db.execute(
                "INSERT INTO idempotency_keys (key, fingerprint, status) VALUES ($1, $2, 'in_progress')",
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
        _in_flight.discard(key)


def replay(existing: Any, body: bytes) -> lab.Response:
    if existing["fingerprint"] != fingerprint(body):
        return lab.Response(422, {"error": "key reused with a different request body"})
    if existing["status"] != "completed":
        return lab.Response(409, {"error": "a request with this key is in progress"})
    return lab.Response(existing["response_status"], json.loads(existing["response_body"]))


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
