"""Draws a trace as sessions side by side, one column each, one row per step in global order.

The layout follows PostgreSQL's isolation tester output and Hermitage's annotated scripts: every
step shows its SQL with parameters and what came back; a step that waited on a lock shows
``<waiting ...>`` where it started and ``<... completed>`` where it finished.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from lab.contracts import Response
from lab.engine.scheduler import SessionResult
from lab.engine.trace import Trace


def timeline(trace: Trace, results: Sequence[SessionResult] = (), *, title: str = "") -> Table:
    """The side-by-side table; plain when printed to a console without a terminal."""
    sessions = trace.sessions() or [r.name for r in results]
    table = Table(title=title or None, box=box.SIMPLE_HEAD, show_lines=False, expand=True, title_justify="left")
    table.add_column("#", justify="right", style="dim", no_wrap=True, ratio=None, width=3)
    for name in sessions:
        table.add_column(name, ratio=1, overflow="fold")
    for number, row in enumerate(trace.rows, 1):
        cell = Text(row.text, style="bold red" if row.text.startswith("✗") else "")
        if row.waiting:
            cell.append("\n<waiting ...>", style="yellow")
        elif row.result is not None:
            cell.append("\n" + _arrow(row.result), style="red" if row.error else "green")
        table.add_row(str(number), *[cell if name == row.session else Text("") for name in sessions])
    if results:
        by_name = {r.name: r for r in results}
        table.add_row("", *[_answer(by_name[name]) if name in by_name else Text("") for name in sessions])
    return table


def _arrow(result: str) -> str:
    return result if result.startswith("→") else f"→ {result}"


def _answer(result: SessionResult) -> Text:
    if result.crashed:
        return Text("(crashed: no answer)", style="red")
    if result.error is not None:
        return Text(f"raised {type(result.error).__name__}: {result.error}", style="red")
    if isinstance(result.result, Response):
        return Text(f"answered {result.result.status} {_compact(result.result.body)}", style="bold cyan")
    return Text("returned" if result.result is None else f"returned {result.result!r}", style="cyan")


def _compact(body: dict[str, object]) -> str:
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in body.items()) + "}"


def verdict_line(anomalies: Sequence[str], holds: str) -> Text:
    """The one line under a timeline: the anomaly named, or the invariant that held."""
    if anomalies:
        return Text("✗ anomaly: " + "; ".join(anomalies), style="bold red")
    return Text(f"✓ invariant held: {holds}", style="bold green")


def render(
    trace: Trace, results: Sequence[SessionResult], anomalies: Sequence[str], *, holds: str, title: str = ""
) -> RenderableType:
    return Group(timeline(trace, results, title=title), verdict_line(anomalies, holds))


def plain(renderable: RenderableType, width: int = 120) -> str:
    """Render as a pipe would see it: no colour, fixed width. The form golden transcripts compare."""
    console = Console(width=width, color_system=None, force_terminal=False, record=True, file=io.StringIO())
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"

