"""The record of one scheduled run: which session did what, in the order it happened.

Kept apart from rendering so that tests compare rows exactly and the timeline only draws them; a row's
text (a statement with its parameters, what came back) is written once, when the step is recorded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from lab.engine.conflicts import Footprint


@dataclass
class Row:
    """One line of the timeline: a step a session took, and what came back."""

    session: str
    text: str
    result: str | None = None
    error: bool = False
    waiting: bool = False


@dataclass
class Event:
    """One step as the reduction sees it: who took it, what it may touch, and the lock waits around it."""

    session: str
    footprint: Footprint
    round: int  # a relay's later round starts after every step of the earlier one
    row: int | None = None  # its line on the timeline
    blocked: bool = False  # it waited on a lock
    woke: list[str] = field(default_factory=list)  # sessions whose waiting step completed during it


@dataclass
class Trace:
    """Rows in global order; a blocked step gets a second row when it completes."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)  # one per scheduler choice, for the reduction and the why

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


# -- how a statement and what came back are written into a row -------------------------------------------


def statement_text(sql: str, args: Sequence[Any]) -> str:
    """One line: the SQL with its whitespace folded, then its parameters."""
    text = re.sub(r"\s+", " ", sql).strip().removesuffix(";")  # asyncpg sends 'COMMIT;': the row says COMMIT
    if args:
        text += "  -- " + ", ".join(f"${i}={short(a)}" for i, a in enumerate(args, 1))
    return text


def short(value: Any, limit: int = 16) -> str:
    if isinstance(value, datetime):
        return value.strftime("%H:%M:%S")  # a lease on the lab clock (lab.clock) reads as time into the run
    shown = repr(value.decode() if isinstance(value, bytes) else value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…'"


def row_text(row: asyncpg.Record | None) -> str:
    if row is None:
        return "(no row)"
    return "(" + ", ".join(f"{k}={value_text(v)}" for k, v in row.items()) + ")"


def value_text(value: Any) -> str:
    return "NULL" if value is None else short(value, 32)


def rows_text(rows: list[asyncpg.Record]) -> str:
    if len(rows) <= 2:
        return "[" + ", ".join(row_text(r) for r in rows) + "]"
    return f"{len(rows)} rows"
