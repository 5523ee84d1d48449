"""The types a handler speaks: what the brief calls the workshop API.

They live apart from the harness so that a learner's file needs nothing but ``import lab``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Response:
    """What the charge endpoint answers; replays must reproduce it exactly."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    """One message the relay delivers to the inbox consumer (scenario 4)."""

    event_id: str
    sku: str
    qty: int


class RejectedEvent(ValueError):
    """A consumer refuses an event it can never apply (malformed): the relay dead-letters it, never retries it."""


class ProviderError(Exception):
    """The payment provider answered with an HTTP error status (402 declined, 503 down, ...)."""

    def __init__(self, status: int, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"provider answered {status}" + (f": {message}" if message else ""))
        self.status = status
        self.retry_after = retry_after
