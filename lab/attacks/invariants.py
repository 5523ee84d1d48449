"""Invariants, read from the database after a run: the provider's ledger, never a handler's word.

Each returns the anomalies it found, one plain sentence each; an empty list means it held.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from lab.postgres.workspace import Workspace


class _Request(Protocol):
    @property
    def session(self) -> str: ...

    @property
    def key(self) -> str: ...


Invariant = Callable[[Workspace, Sequence[_Request]], Awaitable[list[str]]]


async def _per_key(workspace: Workspace, requests: Sequence[_Request], outcome_filter: str) -> dict[str, list[str]]:
    """Ledger rows grouped by the Idempotency-Key of the request whose session made the call.

    The lab knows which session sent which key, so a handler cannot hide a duplicate by passing the
    provider some other reference.
    """
    key_of = {r.session: r.key for r in requests}
    rows = await workspace.admin.fetch(
        f"SELECT session, coalesce(charge_id, outcome) AS what FROM {workspace.ledger}.provider_calls"
        f" WHERE {outcome_filter} ORDER BY call_no"
    )
    grouped: dict[str, list[str]] = {}
    for row in rows:
        grouped.setdefault(key_of.get(row["session"], "?"), []).append(row["what"])
    return grouped


async def at_most_one_provider_call_per_key(workspace: Workspace, requests: Sequence[_Request]) -> list[str]:
    """Scenario 1: a key is processed once, so the provider is called at most once for it."""
    calls = await _per_key(workspace, requests, "true")
    return [f"key {key} charged {len(c)} times ({', '.join(c)})" for key, c in calls.items() if len(c) > 1]


async def at_most_one_charge_per_key(workspace: Workspace, requests: Sequence[_Request]) -> list[str]:
    """Scenario 3: calls may repeat with the same provider key, but money moves once per key."""
    charges = await _per_key(workspace, requests, "outcome = 'charged'")
    return [f"key {key} charged {len(c)} times ({', '.join(c)})" for key, c in charges.items() if len(c) > 1]


# Scenario 3 compares two records the handler cannot forge: what each client got on the wire (the lab's
# client_answers) and what the key's row will replay (a charge endpoint's idempotency_keys table).
async def answered_as_stored(workspace: Workspace, requests: Sequence[_Request]) -> list[str]:
    """Scenario 3: every client answered 2xx got exactly the response its key stores for replay."""
    anomalies = []
    for row in await workspace.admin.fetch(
        f"""SELECT a.session, a.idempotency_key AS key, a.status, a.body,
                   k.status AS state, k.response_status, k.response_body
            FROM {workspace.ledger}.client_answers a LEFT JOIN {workspace.schema}.idempotency_keys k
                 ON k.key = a.idempotency_key
            WHERE a.status BETWEEN 200 AND 299 ORDER BY a.answer_no"""
    ):
        said, who = _said(row["status"], row["body"]), f"key {row['key']}: {row['session']} was answered"
        if row["state"] != "completed":
            anomalies.append(f"{who} {said}, but the key is {row['state'] or 'absent'}: nothing to replay")
        elif (kept := _said(row["response_status"], row["response_body"])) != said:
            anomalies.append(f"{who} {said}, but the key replays {kept}")
    return anomalies


def _said(status: int | None, body: str | None) -> str:
    """A response in a few words: the charge id when there is one, else status and body."""
    content = json.loads(body) if body is not None else None
    charge = content.get("charge_id") if isinstance(content, dict) else None
    return f"{status} {charge}" if charge else f"{status} {content}"


async def called_once_and_answered_as_stored(workspace: Workspace, requests: Sequence[_Request]) -> list[str]:
    """Scenario 3: the provider is called once per key, and every client answered 2xx got what the key stores."""
    return [
        *await at_most_one_provider_call_per_key(workspace, requests),
        *await answered_as_stored(workspace, requests),
    ]


async def charged_once_after_recovery(workspace: Workspace, requests: Sequence[_Request]) -> list[str]:
    """Scenario 3 after a crash and the client's retry: one charge per key, completed, answered as stored.

    A retry may call the provider again (the crashed owner could not say whether it had charged), so
    calls are not counted here, charges are: with the request's key sent to the provider, one.
    """
    charges = await _per_key(workspace, requests, "outcome = 'charged'")
    status = {
        row["key"]: row["status"]
        for row in await workspace.admin.fetch(f"SELECT key, status FROM {workspace.schema}.idempotency_keys")
    }
    anomalies = []
    for key in dict.fromkeys(r.key for r in requests):
        if len(made := charges.get(key, [])) != 1:
            anomalies.append(f"key {key} charged {len(made)} times" + (f" ({', '.join(made)})" if made else ""))
        if status.get(key) != "completed":
            anomalies.append(f"key {key} ended {status.get(key, 'absent')}, not completed")
    return [*anomalies, *await answered_as_stored(workspace, requests)]


# Scenario 4 reads the relay's tables (lab.inbox.RELAY_SQL) against the handler's own.
def _valid(schema: str) -> str:
    """A message the consumer can apply: it names an event, a positive quantity and a SKU that exists.

    A field the message lacks is NULL, so the test is ``IS TRUE``: a missing field makes a message invalid.
    """
    return f"(o.event_id <> '' AND o.qty > 0 AND o.sku IN (SELECT sku FROM {schema}.inventory)) IS TRUE"


async def inventory_drift(workspace: Workspace) -> list[tuple[str, int, int, list[tuple[str, int]]]]:
    """Each SKU whose ``reserved`` differs from its distinct valid events: (sku, reserved, expected, events).

    The truth is what the producer published (the relay's outbox), counted once per event id
    however many messages carried it; what the consumer says it did plays no part.
    """
    s = workspace.schema
    rows = await workspace.admin.fetch(
        f"""WITH events AS (
                SELECT DISTINCT ON (o.event_id) o.event_id, o.sku, o.qty FROM {s}.relay_outbox o
                WHERE {_valid(s)} ORDER BY o.event_id, o.seq
            )
            SELECT i.sku, i.reserved, coalesce(sum(e.qty), 0) AS expected,
                   coalesce(array_agg(e.event_id ORDER BY e.event_id) FILTER (WHERE e.event_id IS NOT NULL), '{{}}')
                       AS ids,
                   coalesce(array_agg(e.qty ORDER BY e.event_id) FILTER (WHERE e.event_id IS NOT NULL), '{{}}') AS qtys
            FROM {s}.inventory i LEFT JOIN events e USING (sku)
            GROUP BY i.sku, i.reserved HAVING i.reserved <> coalesce(sum(e.qty), 0) ORDER BY i.sku"""
    )
    return [(r["sku"], r["reserved"], r["expected"], list(zip(r["ids"], r["qtys"], strict=True))) for r in rows]


async def reserved_is_sum_of_distinct_events(workspace: Workspace) -> list[str]:
    """Scenario 4: reserved per SKU is the sum of distinct events' quantities; none lost, none applied twice."""
    anomalies = [_drift(*row) for row in await inventory_drift(workspace)]
    s = workspace.schema
    for row in await workspace.admin.fetch(
        f"""SELECT o.seq, o.event_id, o.sku, o.qty,
                   EXISTS (SELECT 1 FROM {s}.relay_acks a WHERE a.seq = o.seq) AS acked,
                   d.error,
                   EXISTS (SELECT 1 FROM {s}.processed_events p WHERE p.event_id = o.event_id) AS recorded,
                   ({_valid(s)}) AS valid
            FROM {s}.relay_outbox o LEFT JOIN {s}.dead_letters d USING (seq) ORDER BY o.seq"""
    ):
        what = f"event {row['event_id']!r} ({row['sku']}, qty {row['qty']})"
        if not row["acked"]:
            anomalies.append(f"{what} never acknowledged: message {row['seq']} still with the relay")
        elif row["valid"] and row["error"] is not None:
            anomalies.append(f"{what} lost: dead-lettered although valid ({row['error']})")
        elif not row["valid"] and row["error"] is None:
            anomalies.append(f"malformed {what} accepted instead of rejected")
        elif not row["valid"] and row["recorded"]:
            anomalies.append(f"malformed {what} rejected, but recorded in processed_events: half-applied")
    return anomalies


def _drift(sku: str, reserved: int, expected: int, events: list[tuple[str, int]]) -> str:
    if len(events) == 1 and reserved % events[0][1] == 0:
        event_id, qty = events[0]
        times = reserved // qty
        applied = "lost" if times == 0 else f"applied {times} times"
        return f"event {event_id} {applied} ({sku} reserved {reserved}, expected {expected})"
    gap = reserved - expected
    return f"{sku} reserved {reserved}, expected {expected}: " + (f"surplus {gap}" if gap > 0 else f"{-gap} lost")
