"""The "watch a race" journey for a charge endpoint: the timeline, then every interleaving, then stress.

Buggy and fixed sides go through the very same attack; the verdict table at the end says whether the
lab behaved as expected (the bug reproduced, the fix held), and that decides the exit code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lab.charge import ChargeLab, CrashAttack, Request, duplicates
from lab.errors import LabError
from lab.registry import ScenarioInfo
from lab.timeline import render
from lab.workspace import Workspace

EXIT_AS_EXPECTED, EXIT_INVARIANT_BROKEN = 0, 1


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


@dataclass
class SideVerdict:
    side: str
    cells: dict[str, str] = field(default_factory=dict)
    broken: int = 0  # anomalies seen anywhere
    reproduced: bool = False

    def as_expected(self) -> bool:
        return self.reproduced if self.side == "buggy" else self.broken == 0


@contextmanager
def progress_bar(console: Console, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal; nothing at all when piped (golden transcripts stay clean)."""
    if not console.is_terminal:
        yield lambda _done: None
        return
    columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


async def charge_journey(console: Console, workspace: Workspace, info: ScenarioInfo, options: RunOptions) -> int:
    buggy = info.module("buggy")
    schedule = buggy.CANONICAL
    attack: CrashAttack | None = getattr(buggy, "CRASH", None)
    if attack is None and options.crash and not (options.canonical or options.explore or options.stress):
        raise LabError(f"scenario {info.number} has no crash-point attack (scenario 3 has one: lab run 3 --crash)")
    verdicts: list[SideVerdict] = []
    for side in options.sides:
        module = info.module(side)
        verdict = SideVerdict(side)
        charge_lab = ChargeLab(
            workspace, module.INVARIANT, step_timeout=options.step_timeout, network_latency=options.latency_ms / 1000
        )
        async with charge_lab as lab:
            await lab.install(module)
            if options.canonical:
                chooser = schedule.chooser(strict=side == "buggy")
                outcome = await lab.run(module.handle_charge, duplicates(2), chooser)
                console.print(
                    render(outcome.trace, outcome.results, outcome.anomalies, holds=_holds(module),
                           title=f"{info.slug} ({side}) under the canonical schedule")
                )
                console.print()
                count = len(outcome.anomalies)
                verdict.cells["canonical"] = f"{count} anomal{'y' if count == 1 else 'ies'}"
                verdict.broken += len(outcome.anomalies)
                verdict.reproduced |= bool(outcome.anomalies)
            if options.explore:
                for sessions in options.sessions or ((2,) if side == "buggy" else (2, 3)):
                    with progress_bar(console, f"{side}: interleavings of {sessions} sessions", None) as tick:
                        found = await lab.explore(module.handle_charge, duplicates(sessions), tick)
                    verdict.cells[f"interleavings ({sessions} sessions)"] = (
                        f"anomaly in {found.failing} of {found.runs} ({found.seconds:.2f} s)"
                    )
                    verdict.broken += found.failing
                    verdict.reproduced |= found.failing > 0
            if options.crash and attack is not None:
                with progress_bar(console, f"{side}: crash points", None) as tick:
                    crashed = await lab.crash_points(
                        module.handle_charge, duplicates(1), [Request("T2")],
                        pause=attack.retry_after, invariant=attack.invariant, progress=tick,
                    )
                verdict.cells["crash points"] = (
                    f"anomaly in {crashed.failing} of {crashed.runs} ({crashed.seconds:.2f} s)"
                )
                verdict.broken += crashed.failing
                verdict.reproduced |= crashed.failing > 0
            if options.stress:
                for concurrency in options.concurrency:
                    with progress_bar(console, f"{side}: stress at {concurrency}", options.trials) as tick:
                        stressed = await lab.stress(module.handle_charge, concurrency, options.trials, tick)
                    verdict.cells[f"stress x{concurrency}"] = (
                        f"{stressed.rate:.0%} of {stressed.trials} trials "
                        f"({stressed.trials / stressed.seconds:.0f}/s)"
                    )
                    verdict.broken += stressed.failing
                    verdict.reproduced |= stressed.failing > 0
        verdicts.append(verdict)
    console.print(verdict_table(info, verdicts))
    if options.stress:
        console.print(
            f"stress: sessions released together by a barrier, {options.latency_ms:g} ms of simulated network"
            " before each statement (--latency-ms)", style="dim", highlight=False,
        )
    return EXIT_AS_EXPECTED if all(v.as_expected() for v in verdicts) else EXIT_INVARIANT_BROKEN


def _holds(module: Any) -> str:
    doc = (module.INVARIANT.__doc__ or "").strip().split("\n")[0]
    return doc.split(": ", 1)[-1].rstrip(".")


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
