"""``lab``: the command line. Exit codes mean something, as in Maelstrom.

0  the lab behaved as expected (the bug reproduced, the fix held; a checked handler passed)
1  an invariant was violated where it should hold (or a bug failed to reproduce)
2  the lab could not run: bad input, no database, a handler that cannot be called
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lab.errors import LabError
from lab.journey import RunOptions
from lab.registry import SCENARIOS, ScenarioInfo, runner, scenario
from lab.scheduler import HandlerHung, ScheduleError

EXIT_CANNOT_RUN = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one clear line and exit 2, not a usage wall."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"lab: {message} (see 'lab --help')\n")
        raise SystemExit(EXIT_CANNOT_RUN)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 2,10,100, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"every count must be at least 1: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lab", description="Idempotency bugs reproduced on demand against a real PostgreSQL.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    commands.add_parser("list", help="the scenarios, their bugs and their fixes")

    run = commands.add_parser("run", help="watch a race: the buggy handler, then the fix, under the same attack")
    run.add_argument("scenario", help="number (1) or name (s1_dedup_race)")
    side = run.add_mutually_exclusive_group()
    side.add_argument("--buggy", action="store_true", help="only the buggy handler")
    side.add_argument("--fixed", action="store_true", help="only the fix")
    run.add_argument("--explore", action="store_true", help="every interleaving (depth-first over the schedule)")
    run.add_argument("--stress", action="store_true", help="no gates: sessions released together, many trials")
    run.add_argument("--crash", action="store_true", help="crash the original at every step boundary, then retry")
    run.add_argument("--sessions", type=_counts, default=(), help="explore interleavings of N sessions (e.g. 2,3)")
    run.add_argument("--trials", type=_positive, default=100, help="stress trials (default 100)")
    run.add_argument("--concurrency", type=_counts, default=(2,), help="stress sessions per trial, e.g. 2,10,100")
    run.add_argument("--latency-ms", type=float, default=1.0,
                     help="stress: simulated network hop before each statement (default 1; 0 = a bare Unix socket)")
    run.add_argument("--step-timeout", type=float, default=5.0, help="seconds a handler may stall (default 5)")
    run.add_argument("--clients", type=_positive, default=100, help="scenario 2: clients in the herd (default 100)")
    run.add_argument("--seed", type=int, default=1, help="scenario 2: seed of the virtual-time run (default 1)")
    run.add_argument("--plot", metavar="FILE.png", help="scenario 2: also write the herd plot as an image")

    herd = commands.add_parser("herd", help="scenario 2 against Postgres: Brooker's backoff table")
    herd.add_argument("--occ", action="store_true", required=True, help="optimistic-concurrency clients on one row")
    herd.add_argument("--clients", type=_counts, default=(10, 25, 50), help="client counts (default 10,25,50)")

    exercise = commands.add_parser("exercise", help="workshop: copy scenario N's buggy handler to workshop/ to fix")
    exercise.add_argument("scenario", help="number (1) or name (s1_dedup_race)")
    exercise.add_argument("--force", action="store_true", help="overwrite your copy with the buggy handler again")
    check = commands.add_parser("check", help="workshop: grade your handler under the attack its fix is proven with")
    check.add_argument("scenario", help="number (1) or name (s1_dedup_race)")
    check.add_argument("file", nargs="?", help="your handler (default workshop/<scenario>.py)")
    check.add_argument("--step-timeout", type=float, default=2.0, help="seconds a handler may stall (default 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up exactly as Ctrl-C does
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 120  # a pipe or a file: wide enough for two sessions side by side
    try:
        args = build_parser().parse_args(argv)
        if args.command == "list":
            console.print(scenario_table())
            return 0
        if args.command == "run":
            return run_scenario(console, scenario(args.scenario), _run_options(args))
        if args.command in ("exercise", "check"):
            return workshop_command(console, args)
        if args.command == "herd":
            return occ_table(console, args.clients)
        raise LabError(f"unknown command {args.command!r}")
    except (LabError, ScheduleError, HandlerHung) as exc:
        # soft_wrap: the one line stays one line in a pipe; escape: a handler's words are not markup
        Console(stderr=True, highlight=False).print(f"[bold red]lab:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        Console(stderr=True, highlight=False).print("lab: interrupted; everything the lab started is stopped")
        return EXIT_INTERRUPTED


def _run_options(args: argparse.Namespace) -> RunOptions:
    everything = not (args.explore or args.stress or args.crash)
    sides = ("buggy",) if args.buggy else ("fixed",) if args.fixed else ("buggy", "fixed")
    return RunOptions(
        sides=sides,
        canonical=everything,
        explore=everything or args.explore,
        stress=everything or args.stress,
        crash=everything or args.crash,
        sessions=args.sessions,
        trials=args.trials,
        concurrency=args.concurrency,
        step_timeout=args.step_timeout,
        latency_ms=args.latency_ms,
        clients=args.clients,
        seed=args.seed,
        plot=args.plot,
    )


def scenario_table() -> Table:
    table = Table(title="Idempotency Lab scenarios", title_justify="left")
    for column in ("#", "scenario", "the bug", "the fix", "make"):
        table.add_column(column)
    for info in SCENARIOS.values():
        name = f"{info.title}\n[dim]{info.slug}[/]"
        table.add_row(str(info.number), name, info.bug, info.fix, f"make scenario-{info.number}")
    return table


def run_scenario(console: Console, info: ScenarioInfo, options: RunOptions) -> int:
    play: Callable[..., Awaitable[int]] = runner(info)  # type: ignore[assignment]  # resolved by name
    if not info.needs_postgres:
        return _run(play(console, None, info, options))
    from lab.postgres import provision, verify  # deferred: `lab list` must not pay for it
    from lab.workspace import Workspace

    with provision() as pg:
        console.print(pg.description, style="dim")

        async def journey() -> int:
            await verify(pg)
            workspace = await Workspace.open(pg.dsn)
            try:
                return await play(console, workspace, info, options)
            finally:
                await workspace.close()

        return _run(journey())


def workshop_command(console: Console, args: argparse.Namespace) -> int:
    """`lab exercise` and `lab check` (lab/workshop.py): 0 pass, 1 fail, 2 cannot grade."""
    from lab.workshop import check, exercise

    if args.command == "exercise":
        return exercise(console, scenario(args.scenario), force=args.force)
    return check(console, scenario(args.scenario), args.file, step_timeout=args.step_timeout)


def occ_table(console: Console, clients: tuple[int, ...]) -> int:
    """Brooker's table: N clients on one row with optimistic concurrency, four backoff policies."""
    from lab.occ import run_occ_table
    from lab.postgres import provision, verify

    with provision() as pg:
        console.print(pg.description, style="dim")

        async def table() -> int:
            await verify(pg)
            await run_occ_table(console, pg.dsn, clients=clients)
            return 0

        return _run(table())


def _run(coro: Awaitable[int]) -> int:
    return asyncio.run(_as_coroutine(coro))


async def _as_coroutine(awaitable: Awaitable[int]) -> int:
    return await awaitable


def _interrupt(_signum: int, _frame: Any) -> None:
    """Turn SIGTERM into SIGINT: inside asyncio.run that cancels the main task, so every ``finally`` runs."""
    signal.raise_signal(signal.SIGINT)


if __name__ == "__main__":
    raise SystemExit(main())
