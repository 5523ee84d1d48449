"""The lab's clock: what "now" is for a handler's leases, moved only by the harness.

Exploration replays a schedule hundreds of times and expects the very same steps each time, so a
lease cannot be measured in wall time: a slow replay would see it expire. Every run starts at the
same instant, and time passes only when the lab says so ("the client retries a minute later", "the
lease expires while T1 waits for the provider"). A production handler would use the database's
``now()`` instead; the handler passes ``lab.clock.now()`` as a parameter, so the timeline shows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from lab.engine.scheduler import Choice, Chooser

#: Where every run starts. Midnight, so the timeline's ``00:00:30`` reads as "30 s into the run".
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)

_now = EPOCH


def now() -> datetime:
    """The current instant on the lab clock (timezone-aware, UTC)."""
    return _now


def advance(seconds: float) -> datetime:
    """Move the clock forward; time never runs backwards within a run."""
    global _now
    if seconds < 0:
        raise ValueError(f"the lab clock only moves forward, not by {seconds:g} s")
    _now += timedelta(seconds=seconds)
    return _now


def reset() -> None:
    """Back to :data:`EPOCH`: the harness does this before every run from fresh state."""
    global _now
    _now = EPOCH


class ClockedChooser:
    """Wraps a chooser; just before its n-th decision the clock jumps, e.g. a lease expiring mid-race.

    ``jumps`` maps decision numbers (0 is the first step of the run) to seconds to advance.
    """

    def __init__(self, inner: Chooser, jumps: Mapping[int, float]) -> None:
        self._inner = inner
        self._jumps = dict(jumps)
        self._decisions = 0

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        advance(self._jumps.get(self._decisions, 0.0))
        self._decisions += 1
        return self._inner.choose(runnable, blocked)
