"""The record of one scheduled run: which session did what, in the order it happened.

Kept apart from rendering so that tests compare rows exactly and the timeline only draws them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    """One line of the timeline: a step a session took, and what came back."""

    session: str
    text: str
    result: str | None = None
    error: bool = False
    waiting: bool = False


@dataclass
class Trace:
    """Rows in global order; a blocked step gets a second row when it completes."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, session: str, text: str, *, result: str | None = None, error: bool = False) -> int:
        self.rows.append(Row(session, text, result, error))
        return len(self.rows) - 1

    def finish(self, index: int, result: str, *, error: bool = False) -> None:
        self.rows[index].result = result
        self.rows[index].error = error

    def mark_waiting(self, index: int) -> None:
        self.rows[index].waiting = True

    def sessions(self) -> list[str]:
        """Session names in order of first appearance, so columns read T1, T2, ..."""
        return list(dict.fromkeys(row.session for row in self.rows))

    def order(self) -> list[str]:
        """Who moved at each row: the schedule as it actually ran, for exact comparisons in tests."""
        return [row.session for row in self.rows]
