"""What every ``lab run`` journey shares: the options it was given, its progress bars, its verdict table.

A journey's exit code is decided here, the same way for every scenario: 0 when each side behaved as
the lab expects (the buggy one reproduced its bug, the fixed one held), 1 otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lab.attacks.charge import Exploration, RunOutcome
from lab.engine.schedules import RandomWalk, estimate_runs
from lab.postgres.workspace import ISOLATION_LEVELS
from lab.registry import ScenarioInfo

EXIT_AS_EXPECTED, EXIT_INVARIANT_BROKEN = 0, 1
DEFAULT_PLOT = "herd.png"  # `lab run 2 --plot` with no file name; .gitignore lists it


@dataclass
class RunOptions:
    """What ``lab run`` was asked to do; with neither ``explore`` nor ``stress`` set, it does everything."""

    sides: tuple[str, ...] = ("buggy", "fixed")
    canonical: bool = True
    explore: bool = True
    stress: bool = True
    crash: bool = True  # where the scenario module names a CRASH attack (lab.CrashAttack)
    sessions: tuple[int, ...] = ()  # interleavings of how many sessions; default: buggy 2, fixed 2 and 3
    trials: int = 100
    concurrency: tuple[int, ...] = (2,)
    step_timeout: float = 5.0
    clients: int = 100  # scenario 2: clients in the herd
    seed: int = 1
    plot: str | None = None  # scenario 2: also write the herd plot as a PNG here
    latency_ms: float = 1.0  # stress: simulated network hop before each statement
    isolation: str | None = None  # every session's transactions at this level (a key of ISOLATION_LEVELS)
    no_reduction: bool = False  # explore every interleaving, not one per class of equivalent ones

    @property
    def strong(self) -> bool:
        """Sessions at REPEATABLE READ or SERIALIZABLE: the reduction takes each of their steps to conflict."""
        return self.isolation in ("repeatable-read", "serializable")


@dataclass
class SideVerdict:
    side: str
    cells: dict[str, str] = field(default_factory=dict)
    broken: int = 0  # anomalies seen anywhere
    reproduced: bool = False

    def as_expected(self) -> bool:
        return self.reproduced if self.side == "buggy" else self.broken == 0


#: When piped (a CI log, `| tee`), a long phase prints a line this often, so a run is never silent.
PIPED_EVERY_S = 5.0
#: An exploration estimated at more runs than this (a few seconds at ~3 ms a run) says so as it starts.
ANNOUNCE_ABOVE = 1_000


@contextmanager
def progress_bar(
    console: Console,
    label: str,
    total: int | None,
    *,
    estimated: bool = False,
    every: float = PIPED_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal; when piped, a plain line every ``every`` seconds of a long phase.

    ``total`` is known (stress trials) or ``estimated`` (an exploration's runs, see ``explore_or_stop``);
    a phase shorter than ``every`` prints nothing when piped, so short runs' transcripts stay as they were.
    """
    of = "" if total is None else f" of {'about ' if estimated else ''}{total:,}"
    if not console.is_terminal:
        started = last = clock()
        if estimated and total is not None and total > ANNOUNCE_ABOVE:
            console.print(f"  {label}: about {total:,} runs (an estimate); Ctrl-C stops it with the result so far")

        def line(done: int) -> None:
            nonlocal last
            if (now := clock()) - last >= every:
                last = now
                rate = (now - started) / done if done else 0.0
                left = f", {_duration((total - done) * rate)} to go" if total and 0 < done < total else ""
                console.print(f"  {label}: {done:,}{of} after {now - started:.0f} s{left}", highlight=False)

        yield line
        return
    count = TextColumn("{task.completed:,} of about {task.total:,.0f}") if estimated else MofNCompleteColumn()
    columns = (TextColumn("  {task.description}"), BarColumn(), count, TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        # An estimate can be passed: the bar then stays full rather than run over.
        yield lambda done: bar.update(task, completed=done, total=None if total is None else max(total, done))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


class Tally:
    """What an exploration has run so far, counted as it goes: the partial result if it is stopped."""

    def __init__(self, *also: Callable[[RunOutcome], None]) -> None:
        self.runs = 0
        self.failing = 0
        self._also = also

    def __call__(self, outcome: RunOutcome) -> None:
        self.runs += 1
        self.failing += bool(outcome.anomalies)
        for observe in self._also:
            observe(outcome)


async def explore_or_stop(
    console: Console,
    label: str,
    walk: Callable[[RandomWalk], Awaitable[object]],
    explore: Callable[[Callable[[int], None], Tally], Awaitable[Exploration]],
    tally: Tally | None = None,
    *,
    estimate_first: bool = True,
) -> Exploration:
    """Estimate the runs (a few random walks, see ``RandomWalk``), explore with progress against that
    estimate, and if the user stops it (Ctrl-C, SIGTERM) print what it had found before going on stopping.
    A reduced exploration is not estimated: the walks count every interleaving, and it runs far fewer."""
    tally = tally or Tally()
    estimate: int | None = None
    try:
        if not estimate_first:
            with progress_bar(console, label, None) as tick:
                return await explore(tick, tally)
        estimate = await estimate_runs(walk)
        with progress_bar(console, label, estimate, estimated=True) as tick:
            return await explore(tick, tally)
    except (asyncio.CancelledError, KeyboardInterrupt):
        of = f" of about {estimate:,}" if estimate is not None else ""
        console.print(
            f"{label}: stopped after {tally.runs:,}{of} runs; anomaly in {tally.failing:,} of them", highlight=False
        )
        raise


def reduced(found: Exploration) -> str:
    """How a verdict cell says its runs were one per class of equivalent interleavings."""
    return " classes" if found.reduced else ""


def verdict_table(info: ScenarioInfo, verdicts: list[SideVerdict]) -> Table:
    """One row per side, one column per attack, and whether that side behaved as the lab expects."""
    order = ["canonical", "interleavings", "crash", "stress", "stream"]
    first_seen = list(dict.fromkeys(c for v in verdicts for c in v.cells))
    columns = sorted(first_seen, key=lambda c: order.index(c.split()[0]) if c.split()[0] in order else len(order))
    table = Table(title=f"verdict: scenario {info.number}, {info.title.lower()}", title_justify="left")
    table.add_column("side")
    for column in columns:
        table.add_column(column)
    table.add_column("as expected?")
    for v in verdicts:
        if v.side == "buggy":
            expected = "yes: bug reproduced" if v.as_expected() else "NO: bug did not reproduce"
        else:
            expected = "yes: fix held" if v.as_expected() else "NO: invariant broken"
        table.add_row(v.side, *[v.cells.get(c, "") for c in columns], expected)
    return table


def holds(module: Any) -> str:
    """What a scenario module's invariant promises, from the first line of its docstring."""
    doc = (module.INVARIANT.__doc__ or "").strip().split("\n")[0]
    return doc.split(": ", 1)[-1].rstrip(".")


def isolation_line(isolation: str) -> str:
    """Says which level a run's sessions were put at, and what was left at the server's default."""
    level = ISOLATION_LEVELS[isolation].upper()
    return f"isolation: {level} for every session's transactions, lone statements too; provider, relay: server default"
