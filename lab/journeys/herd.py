"""What ``lab run 2`` shows: the retry herd in virtual time, plotted, then Brooker's table on Postgres.

The attack and its figures are ``lab.attacks.herd``'s; this module only draws them and decides the verdict.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lab.attacks.herd import RETRY_AFTER_S, SIDES, Figures, load_spec, load_wrapper, measure, side_wrapper, violations
from lab.engine.virtual_time import stop_when
from lab.errors import LabError

if TYPE_CHECKING:
    from lab.journeys.shared import RunOptions
    from lab.postgres.workspace import Workspace
    from lab.registry import ScenarioInfo


def run_scenario_2(
    console: Console,
    *,
    sides: tuple[str, ...] = ("buggy", "fixed"),
    clients: int = 100,
    seed: int = 1,
    plot_path: str | None = None,
    retry_module_path: str | None = None,
) -> int:
    """Show the herd and its fix; 0 when the buggy loop shows its hazards and the fixed one holds.

    ``retry_module_path`` replaces the fixed side (adding it if absent) with a learner's file, graded
    like the fix.
    Synchronous on purpose: it runs its own virtual-time loops, so call it outside any running loop.
    """
    if retry_module_path is not None and "fixed" not in sides:
        sides = (*sides, "fixed")
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        raise LabError(f"unknown side {unknown}: choose from {', '.join(SIDES)}")
    plot = None if plot_path is None else _plot_target(plot_path)
    if plot is not None:
        _require_matplotlib()
    labels: dict[str, str] = {}
    figures: dict[str, Figures] = {}
    policies: dict[str, str] = {}
    for side in sides:
        learners = side == "fixed" and retry_module_path is not None
        label = Path(retry_module_path).name if learners and retry_module_path else side
        wrapper = load_wrapper(retry_module_path) if learners and retry_module_path else side_wrapper(side)
        labels[side] = label
        figures[label] = measure(wrapper, clients=clients, seed=seed)
        policies[label] = "your retry wrapper" if learners else _policy(side)

    console.print(
        f"scenario 2 · retry herd · {clients} clients · provider answers 503 for its first"
        f" {float(load_spec().OUTAGE_S):g} s · seed {seed} · virtual time",
        highlight=False,
    )
    print_herd_plot(console, figures, policies)
    console.print(_table(figures))

    healthy = True
    for side, label in labels.items():
        broken = violations(figures[label])
        if side == "buggy":
            expected = {"herd", "charges"} | {f"permanent {s}" for s in load_spec().PERMANENT_STATUSES}
            missing = sorted(expected - broken.keys())
            healthy &= not missing
            verdict = f"hazards not reproduced: {', '.join(missing)}" if missing else "hazards reproduced"
            console.print(f"{label}: {verdict}", highlight=False)
            for name in (n for n in broken if n in expected):
                console.print(f"  - {broken[name]}", highlight=False)
        else:
            healthy &= not broken
            console.print(f"{label}: " + ("holds" if not broken else "BROKEN") + _cost(figures[label]), highlight=False)
            for message in broken.values():
                console.print(f"  - {message}", highlight=False)
    if plot is not None:
        write_herd_png(str(plot), figures, policies, seed=seed)
        console.print(f"plot written to {plot}", highlight=False)
    console.print("verdict: " + ("lab behaved as expected" if healthy else "UNEXPECTED: see above"))
    return 0 if healthy else 1


def _policy(side: str) -> str:
    """The side's retry policy in a few words, from the registry's one-line bug and fix."""
    from lab.registry import scenario

    info = scenario("s2_retry_herd")
    return info.bug.split(":")[0] if side == "buggy" else info.fix.split(",")[0]


def _cost(f: Figures) -> str:
    """What a verdict of "holds" does not say: clients whose retries all fell inside the outage gave up."""
    if not f.gave_up:
        return ""
    return (
        f"; its cost: {f.gave_up:,} of {f.clients:,} clients gave up after {f.gave_up_after} attempts,"
        " all inside the outage"
    )


def _plot_target(path: str) -> Path:
    """Where the image goes: the path as the user wrote it, from the directory they ran lab in."""
    target = Path(path).expanduser().absolute()
    if not target.parent.is_dir():
        raise LabError(f"--plot {path}: there is no directory {target.parent}")
    return target


def _table(figures: dict[str, Figures]) -> Table:
    table = Table(title="what reached the provider", title_justify="left")
    table.add_column("figure")
    for label in figures:
        table.add_column(label, justify="right")
    spec = load_spec()
    rows: list[tuple[str, Callable[[Figures], str]]] = [
        ("herd: peak arrivals / 50 ms after the first wave", lambda f: str(f.peak_after_first_wave)),
        (
            f"herd: peak / 50 ms after recovery (limit N/{round(1 / spec.MAX_PEAK_SHARE)})",
            lambda f: f"{f.peak_after_recovery} at {f.peak_after_recovery_at:.2f} s",
        ),
        ("herd: total attempts", lambda f: str(f.attempts)),
        ("herd: successes", lambda f: str(f.successes)),
        ("herd: clients that gave up", lambda f: str(f.gave_up)),
        ("herd: last client finished", lambda f: f"{f.last_finished_s:.2f} s"),
    ]
    for status in spec.PERMANENT_STATUSES:
        rows.append((f"{status}: calls per client, time to fail", _permanent_cell(status)))
    rows += [
        ("ambiguous timeout: charges per client", lambda f: str(f.charges_per_client)),
        (
            f"429 with Retry-After {RETRY_AFTER_S:g} s: retried after",
            lambda f: "never" if f.retry_after_waited_s is None else f"{f.retry_after_waited_s:.2f} s",
        ),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(f) for f in figures.values()))
    return table


def _permanent_cell(status: int) -> Callable[[Figures], str]:
    return lambda f: f"{f.permanent[status][0]} in {f.permanent[status][1]:.1f} s"


def print_herd_plot(console: Console, figures: dict[str, Figures], policies: dict[str, str] | None = None) -> None:
    """Arrivals per 50 ms, one panel per side, stacked, on the same x and y scales so heights compare."""
    import plotext

    spec = load_spec()
    bucket_s = float(spec.BUCKET_S)
    top = max(max(f.buckets) for f in figures.values())
    right = max(len(f.buckets) for f in figures.values()) * bucket_s
    fig = plotext.figure
    fig.clear()
    if len(figures) > 1:  # plotext makes a 1 x 1 grid no grid at all: one side is drawn on the figure itself
        fig.subplots(len(figures), 1)
    for row, (label, f) in enumerate(figures.items(), start=1):
        sub = fig.subplot(row, 1) if len(figures) > 1 else fig
        sub.theme("colorless")  # the terminal's own colours, readable on dark and light alike
        limit = f.clients * float(spec.MAX_PEAK_SHARE)
        outage_s = float(spec.OUTAGE_S)
        sub.draw(sub.segment([outage_s, right], [limit, limit], marker="─"))
        sub.draw(sub.segment([outage_s, outage_s], [0.5, top], marker="│"))
        # Bars last, over the guides; every bucket is a bar so each is one bucket wide, and empty
        # buckets fall below the y range.
        sub.draw(sub.bar([i * bucket_s for i in range(len(f.buckets))], f.buckets, width=1))
        policy = f" ({policies[label]})" if policies and label in policies else ""
        sub.title(f"{label}{policy}: arrivals per {bucket_s * 1000:g} ms")
        sub.ruler("y").lim(0.5, top)
        sub.ruler("y").ticks([1, limit, top], ["1", f"{limit:g}", str(top)])
        sub.ruler("x").lim(0, right)
        sub.ruler("x").ticks(ticks := [i * 0.5 for i in range(int(right / 0.5) + 1)], [f"{t:g} s" for t in ticks])
    fig.plot_size(min(console.width, 100), 16 * len(figures))
    console.print(Text.from_ansi(fig.build().string()))
    share = round(1 / float(spec.MAX_PEAK_SHARE))
    console.print(f"─ the limit after recovery, N/{share} · │ the provider recovers", style="dim")
    console.print()


#: How to get matplotlib, as the README says it (the lab is installed from its repository, not from PyPI).
PLOT_INSTALL = "pip install -e '.[plot]'"


def _require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise LabError(f"--plot needs matplotlib: in the repository, {PLOT_INSTALL} (the plot extra)")


def write_herd_png(
    path: str, figures: dict[str, Figures], policies: dict[str, str] | None = None, *, seed: int = 1
) -> None:
    """The same panels as the terminal plot, as an image for slides, titled with what was run."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    spec = load_spec()
    bucket_s, outage_s = float(spec.BUCKET_S), float(spec.OUTAGE_S)
    right = max(len(f.buckets) for f in figures.values()) * bucket_s
    fig, axes = plt.subplots(len(figures), 1, sharex=True, sharey=True, figsize=(10, 3.2 * len(figures)), squeeze=False)
    for ax, (label, f) in zip(axes[:, 0], figures.items(), strict=True):
        ax.bar([i * bucket_s for i in range(len(f.buckets))], f.buckets, width=bucket_s, align="edge")
        limit = f.clients * float(spec.MAX_PEAK_SHARE)
        ax.hlines(limit, outage_s, right, linestyles="--", colors="grey", label="limit after recovery")
        ax.axvspan(0, outage_s, color="red", alpha=0.08, label="provider answers 503")
        policy = f" ({policies[label]})" if policies and label in policies else ""
        cost = f"; {f.gave_up:,} gave up after {f.gave_up_after} attempts" if f.gave_up else ""
        ax.set_title(f"{label}{policy}: arrivals per {bucket_s * 1000:g} ms{cost}")
        ax.set_xlim(0, right)
        ax.set_ylabel("arrivals")
        ax.legend(loc="upper right")
    axes[-1, 0].set_xlabel("virtual seconds")
    clients = next(iter(figures.values())).clients
    fig.suptitle(f"retry herd: {clients:,} clients, seed {seed}, provider answers 503 for its first {outage_s:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)




async def herd_journey(console: Console, workspace: Workspace, info: ScenarioInfo, options: RunOptions) -> int:
    """`lab run 2`: the herd in virtual time (its own loops, so in a thread), then Brooker's table on Postgres."""
    stop = threading.Event()
    stop_when.set(stop)  # the thread's virtual-time loops see it (to_thread carries this context)
    try:
        code = await asyncio.to_thread(
            run_scenario_2, console, sides=options.sides, clients=options.clients, seed=options.seed,
            plot_path=options.plot,
        )
    except asyncio.CancelledError:
        stop.set()  # Ctrl-C: asyncio.run waits for the thread, so it must stop now, not when the herd is done
        raise
    if options.sides != ("buggy", "fixed"):  # --buggy or --fixed: that side's herd only, for the projector
        return code
    from lab.attacks.herd_occ import ratio, run_occ_table

    console.print()
    rows = await run_occ_table(console, workspace.dsn, clients=(10, 25, 50))
    console.print(f"no jitter made {ratio(rows, 25):.1f}x the writes of full jitter at N=25", highlight=False)
    return code
