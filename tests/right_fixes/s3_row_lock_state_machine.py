"""Right: the state machine decided in Python, under the key's row lock, instead of in one upsert.

Another design than the lab's fix: SELECT ... FOR UPDATE locks the key's row (or, when there is none
yet, the INSERT's unique key decides between two newcomers, and the loser answers from the winner's
row). Under the lock the handler reads the state and moves it: a live lease answers 409, a failed
key or an expired lease is taken over with the next attempt number. The provider gets the key, and
the outcome is written only WHERE this attempt still holds the key. Expected verdict: exit 0.
"""

import hashlib
import json
import math
from datetime import timedelta
from typing import Any

import asyncpg

import lab

LEASE_SECONDS = 30
SELECT = "SELECT fingerprint, status, response_status, response_body, lease_until, attempt FROM idempotency_keys"


async def handle_charge(db: lab.Db, provider: lab.Provider, key: str, body: bytes) -> lab.Response:
    if not 0 < len(key) <= 255 or amount_of(body) is None:
        return lab.Response(400, {"error": "a 1 to 255 character key and a positive integer amount, please"})
    now = lab.clock.now()
    lease = now + timedelta(seconds=LEASE_SECONDS)
    async with db.acquire() as conn:
        try:
            async with conn.transaction():
                row = await conn.fetchrow(SELECT + " WHERE key = $1 FOR UPDATE", key)
                if row is None:
                    await conn.execute(
                        "INSERT INTO idempotency_keys (key, fingerprint, status, lease_until) VALUES ($1, $2,"
                        " 'in_progress', $3)", key, fingerprint(body), lease,
                    )
                    attempt = 1
                elif row["fingerprint"] != fingerprint(body) or row["status"] == "completed" or (
                    row["status"] == "in_progress" and row["lease_until"] > now
                ):
                    return answer(row, body)
                else:  # failed, or a lease that ran out: this request takes the key over
                    attempt = await conn.fetchval(
                        "UPDATE idempotency_keys SET status = 'in_progress', lease_until = $2, attempt = attempt + 1"
                        " WHERE key = $1 RETURNING attempt", key, lease,
                    )
        except asyncpg.UniqueViolationError:  # another newcomer inserted the key first
            return answer(await conn.fetchrow(SELECT + " WHERE key = $1", key), body)
        try:
            charge_id = await provider.charge(key, json.loads(body)["amount"], idempotency_key=key)
            response = lab.Response(201, {"charge_id": charge_id, "amount": json.loads(body)["amount"]})
            status = "completed"
        except (lab.ProviderError, TimeoutError):
            response = lab.Response(502, {"error": "the payment provider failed; retry with the same key"})
            status = "failed"
        moved = await conn.execute(
            "UPDATE idempotency_keys SET status = $3, response_status = $4, response_body = $5, lease_until = NULL"
            " WHERE key = $1 AND status = 'in_progress' AND attempt = $2",
            key, attempt, status, response.status, json.dumps(response.body),
        )
        if moved != "UPDATE 1":  # the key was taken over while we were away: its row answers
            return answer(await conn.fetchrow(SELECT + " WHERE key = $1", key), body)
        return response


def answer(row: Any, body: bytes) -> lab.Response:
    if row["fingerprint"] != fingerprint(body):
        return lab.Response(422, {"error": "key reused with a different request body"})
    if row["status"] == "completed":
        return lab.Response(row["response_status"], json.loads(row["response_body"]))
    left = ((row["lease_until"] or lab.clock.now()) - lab.clock.now()).total_seconds()
    retry_after = max(1, math.ceil(left))
    return lab.Response(409, {"error": "a request with this key is in progress", "retry_after": retry_after})


def amount_of(body: bytes) -> int | None:
    try:
        amount = json.loads(body).get("amount")
    except (ValueError, AttributeError):
        return None
    return amount if type(amount) is int and amount > 0 else None


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
