"""What a test says: the smallest failing run as a timeline with its anomaly, or what was tried and held.

A failing attack's message is the lab's own (``lab.engine.timeline``): sessions side by side, every
statement with its parameters and what came back, the anomaly under it. A passing one is one line per
attack, so that a green test says how much it proves: how many interleavings, trials, crash points.
"""

from __future__ import annotations

from collections.abc import Sequence

from lab.attacks.handler import Tried
from lab.engine.reduction import explain
from lab.engine.timeline import plain, render


def _count(number: int, unit: str) -> str:
    return f"{number} {unit.removesuffix('s') if number == 1 else unit}"


def summary(tried: Tried) -> str:
    """One line: the attack, how many runs it made, and what came of them."""
    took = f"{tried.seconds:.2f} s"
    if tried.failing:
        return f"{tried.attack}: {tried.failing} of {_count(tried.runs, tried.unit)} broke the invariant ({took})"
    if not tried.complete:
        return f"{tried.attack}: {_count(tried.runs, tried.unit)} held, but not all were run ({took})"
    every = "it held" if tried.runs == 1 else "every one held"
    return f"{tried.attack}: {_count(tried.runs, tried.unit)}, {every} ({took})"


def failure(tried: Tried, before: Sequence[Tried], *, width: int) -> str:
    """The message of a failing attack: what broke, the smallest failing run, and what held before it."""
    if tried.smallest is not None:
        outcome = tried.smallest
        preempted = "" if tried.preemptions is None else f", {_count(tried.preemptions, 'preemptions')}"
        lines = [
            f"{tried.attack}: {tried.failing} of the {_count(tried.runs, tried.unit)} tried broke the invariant.",
            f"The smallest failing run ({_count(len(outcome.trace.rows), 'steps')}{preempted}):",
            "",
            plain(render(outcome.trace, outcome.results, outcome.anomalies, holds=""), width=width).strip("\n"),
            *explain(outcome.trace),
        ]
    elif tried.failing:
        rate = f"{100 * tried.failing / tried.runs:.0f}%"
        lines = [
            f"{tried.attack}: {tried.failing} of {_count(tried.runs, tried.unit)} ({rate}) broke the invariant.",
            *(f"✗ anomaly: {example}" for example in dict.fromkeys(tried.examples)),
            "Stress keeps no schedule to show: lab.every_interleaving shows the smallest failing run step by step."
            " If every interleaving holds, the race depends on timing the lab cannot pause: a step that does not"
            " go through the db it gave, lab.provider or a fake wrapped with lab.fake()?",
        ]
    else:
        lines = [
            f"{tried.attack}: not proven. {_count(tried.runs, tried.unit)} held, and there are more:"
            " raise limit=, or attack with fewer sessions.",
        ]
    if before:
        lines += ["", "Held before it in this test:", *(f"  {summary(t)}" for t in before)]
    return "\n".join(lines)
