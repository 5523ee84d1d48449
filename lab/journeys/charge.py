"""The "watch a race" journey for a charge endpoint: the timeline, then every interleaving, then stress.

Buggy and fixed sides go through the very same attack; the verdict table at the end says whether the
lab behaved as expected (the bug reproduced, the fix held), and that decides the exit code.
"""

from __future__ import annotations

from functools import partial

from rich.console import Console

from lab.attacks.charge import ChargeLab, CrashAttack, Request, duplicates
from lab.engine.reduction import explain
from lab.engine.timeline import render
from lab.journeys.shared import (
    EXIT_AS_EXPECTED,
    EXIT_INVARIANT_BROKEN,
    RunOptions,
    SideVerdict,
    explore_or_stop,
    holds,
    progress_bar,
    reduced,
    verdict_table,
)
from lab.postgres.workspace import Workspace
from lab.registry import ScenarioInfo


async def charge_journey(console: Console, workspace: Workspace, info: ScenarioInfo, options: RunOptions) -> int:
    buggy = info.module("buggy")
    schedule = buggy.CANONICAL
    attack: CrashAttack | None = getattr(buggy, "CRASH", None)
    verdicts: list[SideVerdict] = []
    for side in options.sides:
        module = info.module(side)
        verdict = SideVerdict(side)
        charge_lab = ChargeLab(
            workspace, module.INVARIANT, step_timeout=options.step_timeout, network_latency=options.latency_ms / 1000,
            connect=workspace.sessions(options.isolation), strong=options.strong,
        )
        async with charge_lab as lab:
            await lab.install(module)
            if options.canonical:
                chooser = schedule.chooser(strict=side == "buggy")
                outcome = await lab.run(module.handle_charge, duplicates(2), chooser)
                console.print(
                    render(outcome.trace, outcome.results, outcome.anomalies, holds=holds(module),
                           title=f"{info.slug} ({side}) under the canonical schedule")
                )
                for line in explain(outcome.trace) if outcome.anomalies else ():
                    console.print(line, highlight=False)
                console.print()
                count = len(outcome.anomalies)
                verdict.cells["canonical"] = f"{count} anomal{'y' if count == 1 else 'ies'}"
                verdict.broken += len(outcome.anomalies)
                verdict.reproduced |= bool(outcome.anomalies)
            if options.explore:
                for sessions in options.sessions or ((2,) if side == "buggy" else (2, 3)):
                    requests = duplicates(sessions)
                    found = await explore_or_stop(
                        console, f"{side}: interleavings of {sessions} sessions",
                        partial(lab.run, module.handle_charge, requests),  # + a random walk: the estimate
                        partial(lab.explore, module.handle_charge, requests,  # + progress and a tally
                                reduction=not options.no_reduction),
                        estimate_first=options.no_reduction,
                    )  # fmt: skip
                    verdict.cells[f"interleavings ({sessions} sessions)"] = (
                        f"anomaly in {found.failing} of {found.runs}{reduced(found)} ({found.seconds:.2f} s)"
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
