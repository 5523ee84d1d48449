"""Invariants, read from the database after a run: the provider's ledger, never a handler's word.

Each returns the anomalies it found, one plain sentence each; an empty list means it held.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from lab.workspace import Workspace


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
