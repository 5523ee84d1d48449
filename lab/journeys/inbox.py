"""The "watch a race" journey for the inbox consumer: the relay's crash, then every attack on both sides.

The buggy handler and the fix go through the very same attacks: the canonical crash as a timeline,
two concurrent deliveries in every interleaving, a crash at every step boundary, and a stream with
random redeliveries and crashes (plus one with malformed events). The verdict table says whether the
lab behaved as expected, and that decides the exit code.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rich.console import Console

from lab.attacks.charge import RunOutcome
from lab.attacks.inbox import Delivery, InboxLab, concurrent, crash_points
from lab.attacks.inbox_stream import StreamPlan, StreamResult, run_stream
from lab.engine.reduction import explain
from lab.engine.timeline import render
from lab.journeys.shared import (
    EXIT_AS_EXPECTED,
    EXIT_INVARIANT_BROKEN,
    RunOptions,
    SideVerdict,
    Tally,
    explore_or_stop,
    holds,
    progress_bar,
    reduced,
    verdict_table,
)
from lab.postgres.workspace import Workspace
from lab.registry import ScenarioInfo

MALFORMED = StreamPlan(events=200, malformed=12)  # four of each kind, in a stream that must go on


async def inbox_journey(console: Console, workspace: Workspace, info: ScenarioInfo, options: RunOptions) -> int:
    verdicts: list[SideVerdict] = []
    streams: list[tuple[str, StreamResult]] = []
    for side in options.sides:
        module = info.module(side)
        verdict = SideVerdict(side)
        consumers = workspace.sessions(options.isolation)
        async with InboxLab(
            workspace, module.INVARIANT, step_timeout=options.step_timeout, connect=consumers, strong=options.strong
        ) as lab:
            await lab.install(module)
            if options.canonical:
                await _canonical(console, lab, info, module, verdict)
            if options.explore:
                for sessions in options.sessions or (2,):
                    await _interleavings(console, lab, module, verdict, sessions, not options.no_reduction)
            if options.crash:
                await _crash_points(console, lab, module, verdict)
            if options.stress:
                streams.append((side, await _stream(console, workspace, module, verdict, options)))
                await _malformed(workspace, module, verdict, options)
        verdicts.append(verdict)
    for side, stream in streams:
        console.print(stream_line(side, stream))
    if streams:
        console.print()
    console.print(verdict_table(info, verdicts))
    return EXIT_AS_EXPECTED if all(v.as_expected() for v in verdicts) else EXIT_INVARIANT_BROKEN


async def _canonical(console: Console, lab: InboxLab, info: ScenarioInfo, module: Any, verdict: SideVerdict) -> None:
    """The buggy file's schedule, strict for the buggy side; the fix replays it leniently."""
    chooser = info.module("buggy").CANONICAL.chooser(strict=verdict.side == "buggy")
    outcome = await lab.run(module.handle_event, [Delivery("T1")], chooser)
    title = f"{info.slug} ({verdict.side}) under the canonical schedule: the relay crashes before its ack"
    console.print(render(outcome.trace, outcome.results, outcome.anomalies, holds=holds(module), title=title))
    for line in explain(outcome.trace) if outcome.anomalies else ():
        console.print(line, highlight=False)
    console.print()
    _count(verdict, "canonical", len(outcome.anomalies), _plural(len(outcome.anomalies), "anomal"))


async def _interleavings(
    console: Console, lab: InboxLab, module: Any, verdict: SideVerdict, sessions: int, reduction: bool
) -> None:
    """The relay's visibility timeout expired: the same event with several consumers at once."""
    waits = 0

    def seen(outcome: RunOutcome) -> None:
        nonlocal waits
        waits += any(row.waiting for row in outcome.trace.rows)

    deliveries = concurrent(sessions)
    found = await explore_or_stop(
        console, f"{verdict.side}: interleavings of {sessions} deliveries",
        lambda walk: lab.run(module.handle_event, deliveries, walk),
        lambda tick, tally: lab.explore(module.handle_event, deliveries, tick, tally, reduction=reduction),
        Tally(seen),
        estimate_first=not reduction,
    )  # fmt: skip
    _count(
        verdict, f"interleavings ({sessions} deliveries)", found.failing,
        f"anomaly in {found.failing} of {found.runs}{reduced(found)}, a lock wait in {waits} ({found.seconds:.2f} s)",
    )


async def _crash_points(console: Console, lab: InboxLab, module: Any, verdict: SideVerdict) -> None:
    runs: list[RunOutcome] = []
    with progress_bar(console, f"{verdict.side}: a crash at every step boundary", None) as tick:
        swept = await lab.crash_everywhere(module.handle_event, progress=tick, observe=runs.append)
    _count(
        verdict, "crash points", swept.failing,
        f"anomaly in {swept.failing} of {swept.runs} plans, {crash_points(runs[0])} boundaries per delivery "
        f"({swept.seconds:.2f} s)",
    )


async def _stream(
    console: Console, workspace: Workspace, module: Any, verdict: SideVerdict, options: RunOptions
) -> StreamResult:
    plan = StreamPlan(seed=options.seed)
    with progress_bar(console, f"{verdict.side}: a stream of {plan.events:,} events", None) as tick:
        stream = await run_stream(
            workspace, module.handle_event, module.INVARIANT, plan, tick, workspace.sessions(options.isolation)
        )
    cell = f"surplus {stream.surplus:,}, lost {stream.lost:,}" if stream.anomalies else "0 anomalies"
    _count(verdict, "stream", len(stream.anomalies), f"{cell} ({stream.events_per_s:,.0f} events/s)")
    return stream


async def _malformed(workspace: Workspace, module: Any, verdict: SideVerdict, options: RunOptions) -> None:
    """Malformed events in a stream: each must be dead-lettered, none applied, and the stream must go on."""
    plan = replace(MALFORMED, seed=options.seed)
    sessions = workspace.sessions(options.isolation)
    stream = await run_stream(workspace, module.handle_event, module.INVARIANT, plan, sessions=sessions)
    wrong = sum(1 for a in stream.anomalies if a.startswith("malformed"))
    _count(
        verdict, "malformed", len(stream.anomalies),
        f"{plan.malformed - wrong} of {plan.malformed} rejected cleanly, {_plural(len(stream.anomalies), 'anomal')}",
    )


def stream_line(side: str, stream: StreamResult) -> str:
    """The stream's figures in one line: what the relay did, and what it cost or proved."""
    plan = stream.plan
    outcome = (
        f"surplus {stream.surplus:,} units reserved beyond the events ({len(stream.anomalies)} anomalies)"
        if stream.anomalies
        else f"every SKU exact, {stream.events_per_s:,.0f} events/s sustained"
    )
    return (
        f"stream ({side}, seed {plan.seed}): {plan.events:,} events ({stream.messages:,} messages) for {plan.skus} "
        f"SKUs, {plan.consumers} consumers; {stream.deliveries:,} deliveries, {stream.redeliveries:,} of them "
        f"redeliveries ({stream.duplicates} while the first was in flight); {stream.crashes} crashes "
        f"({stream.consumer_crashes} consumer, {stream.relay_crashes} relay before its ack); {stream.seconds:.2f} s: "
        f"{outcome}"
    )


def _count(verdict: SideVerdict, column: str, anomalies: int, cell: str) -> None:
    verdict.cells[column] = cell
    verdict.broken += anomalies
    verdict.reproduced |= anomalies > 0


def _plural(n: int, stem: str) -> str:
    return f"{n} {stem}{'y' if n == 1 else 'ies'}"
