"""``lab``: the command line. Exit codes mean something, as in Maelstrom.

0  the lab behaved as expected (the bug reproduced, the fix held; a checked handler passed)
1  an invariant was violated where it should hold (or a bug failed to reproduce)
2  the lab could not run: bad input, no database, a handler that cannot be called
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import fields, replace
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lab.engine.scheduler import HandlerHung, ScheduleError
from lab.errors import LabError
from lab.journeys.shared import DEFAULT_PLOT, RunOptions, isolation_line
from lab.postgres.workspace import ISOLATION_LEVELS, Workspace
from lab.registry import RUN_FLAGS, SCENARIOS, ScenarioInfo, runner, scenario

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


def _milliseconds(text: str) -> float:
    """A delay: finite and not negative (nan and inf would fail deep in a stress run, 20 s later)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more milliseconds, not {text}")
    return value


def _seconds(text: str) -> float:
    """A timeout: finite and above 0 (0 or -1 would blame a correct handler for making no progress)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
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
    run.add_argument("--explore", action="store_true", help="every interleaving (one per class of equivalent ones)")
    run.add_argument("--no-reduction", action="store_true",
                     help="explore every interleaving, equivalent ones too (no partial-order reduction)")
    run.add_argument("--stress", action="store_true", help="no gates: sessions released together, many trials")
    run.add_argument("--crash", action="store_true", help="crash the original at every step boundary, then retry")
    # No defaults here (RunOptions has them): a flag given is told from one left out, so a scenario
    # whose journey would ignore it can refuse it (the registry says which flags each one honours).
    run.add_argument("--sessions", type=_counts, help="explore interleavings of N sessions (e.g. 2,3)")
    run.add_argument("--trials", type=_positive, help="stress trials (default 100)")
    run.add_argument("--concurrency", type=_counts, help="stress sessions per trial, e.g. 2,10,100 (default 2)")
    run.add_argument("--latency-ms", type=_milliseconds,
                     help="stress: simulated network hop before each statement (default 1; 0 = a bare Unix socket)")
    run.add_argument("--step-timeout", type=_seconds, help="seconds a handler may stall (default 5)")
    run.add_argument("--isolation", choices=ISOLATION_LEVELS, metavar="LEVEL",
                     help="every session's transactions at this level: " + ", ".join(ISOLATION_LEVELS))
    run.add_argument("--clients", type=_positive, help="scenario 2: clients in the herd (default 100)")
    run.add_argument("--seed", type=int, help="scenario 2 and 4: seed of the herd or of the stream (default 1)")
    run.add_argument("--plot", metavar="FILE.png", nargs="?", const=DEFAULT_PLOT,
                     help=f"scenario 2: also write the herd plot as an image (default {DEFAULT_PLOT})")

    matrix = commands.add_parser("matrix", help="every scenario, buggy and fixed, at every isolation level")
    matrix.add_argument("scenarios", nargs="*", help="numbers or names (default: each one that runs transactions)")
    matrix.add_argument("--show", metavar="N/LEVEL/HANDLER",
                        help="one cell and its smallest failing run, e.g. 3/serializable/buggy")
    matrix.add_argument("--step-timeout", type=float, default=5.0, help="seconds a handler may stall (default 5)")

    herd = commands.add_parser("herd", help="scenario 2 against Postgres: Brooker's backoff table")
    herd.add_argument("--occ", action="store_true", required=True, help="optimistic-concurrency clients on one row")
    herd.add_argument("--clients", type=_counts, default=(10, 25, 50), help="client counts (default 10,25,50)")

    exercise = commands.add_parser("exercise", help="workshop: copy scenario N's buggy handler to workshop/ to fix")
    exercise.add_argument("scenario", help="number (1) or name (s1_dedup_race)")
    exercise.add_argument("--force", action="store_true", help="overwrite your copy with the buggy handler again")
    check = commands.add_parser("check", help="workshop: grade your handler under the attack its fix is proven with")
    check.add_argument("scenario", help="number (1) or name (s1_dedup_race)")
    check.add_argument("file", nargs="?", help="your handler (default workshop/<scenario>.py)")
    check.add_argument("--step-timeout", type=_seconds, default=2.0, help="seconds a handler may stall (default 2)")
    check.add_argument("--no-reduction", action="store_true",
                       help="try every interleaving, equivalent ones too, fewest preemptions first")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lab`` program. It takes over SIGINT and SIGTERM, and blocks them once its outcome is decided."""
    try:
        _take_signals()  # inside the try: a SIGTERM can land as soon as its handler is in place
        code = _command(argv)
        _hold_signals()  # inside the try: a signal that lands before this line still counts
    except BaseException as exc:  # wherever the one signal landed, everything started is stopped by now
        _hold_signals()
        if not _interrupted(exc):
            raise
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        Console(stderr=True, highlight=False).print("lab: interrupted; everything the lab started is stopped")
    return code


def _command(argv: Sequence[str] | None) -> int:
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 120  # a pipe or a file: wide enough for two sessions side by side
    try:
        args = build_parser().parse_args(argv)
        if args.command == "list":
            console.print(scenario_table())
            return 0
        if args.command == "run":
            info = scenario(args.scenario)
            return run_scenario(console, info, _run_options(args, info))
        if args.command in ("exercise", "check"):
            return workshop_command(console, args)
        if args.command == "matrix":
            return isolation_matrix(console, args)
        if args.command == "herd":
            return occ_table(console, args.clients)
        raise LabError(f"unknown command {args.command!r}")
    except (LabError, ScheduleError, HandlerHung) as exc:
        # soft_wrap: the one line stays one line in a pipe; escape: a handler's words are not markup
        Console(stderr=True, highlight=False).print(f"[bold red]lab:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_CANNOT_RUN


def _run_options(args: argparse.Namespace, info: ScenarioInfo) -> RunOptions:
    """The options a scenario's journey will honour; any flag it would ignore, or a count it cannot use, is refused."""
    given = [dest for dest in RUN_FLAGS if getattr(args, dest) is not None and getattr(args, dest) is not False]
    if refused := [dest for dest in given if dest not in info.run_flags]:
        takes = ", ".join(flag for dest, flag in RUN_FLAGS.items() if dest in info.run_flags)
        elsewhere = ", ".join(str(i.number) for i in SCENARIOS.values() if set(refused) <= i.run_flags)
        where = f"; scenarios {elsewhere} do" if "," in elsewhere else f"; scenario {elsewhere} does"
        raise LabError(
            f"scenario {info.number} ({info.slug}) does not take {', '.join(RUN_FLAGS[d] for d in refused)}"
            f" (it takes {takes}){where if elsewhere else ''}"
        )
    for count in args.sessions or ():
        if not 2 <= count <= info.max_sessions:
            raise LabError(
                f"--sessions {count}: scenario {info.number} explores every interleaving of 2 to {info.max_sessions}"
                " sessions (a race needs two; past the bound the interleavings grow too many to run)"
                + ("; many more at once: --stress --concurrency N" if "concurrency" in info.run_flags else "")
            )
    for count in args.concurrency or ():
        if count < 2:
            raise LabError(f"--concurrency {count}: stress releases duplicate requests together, so at least 2")
    everything = not (args.explore or args.stress or args.crash)
    sides = ("buggy",) if args.buggy else ("fixed",) if args.fixed else ("buggy", "fixed")
    valued = {field.name for field in fields(RunOptions)} - {"explore", "stress", "crash"}  # switches: below
    chosen = {dest: getattr(args, dest) for dest in valued & RUN_FLAGS.keys() if getattr(args, dest) is not None}
    return replace(
        RunOptions(),
        **chosen,
        sides=sides,
        canonical=everything,
        explore=everything or args.explore,
        stress=everything or args.stress,
        crash=everything or args.crash,
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
    if options.isolation:
        runs_transactions(info, "so --isolation does not apply")
    if not info.needs_postgres:
        return _run(lambda: play(console, None, info, options))
    said = isolation_line(options.isolation) if options.isolation else ""
    return _on_postgres(console, lambda workspace: play(console, workspace, info, options), said)


def runs_transactions(info: ScenarioInfo, consequence: str) -> None:
    """Isolation levels apply only to the scenarios whose sessions run transactions (the registry says which)."""
    if not info.isolation:
        takes = ", ".join(str(i.number) for i in SCENARIOS.values() if i.isolation)
        raise LabError(f"scenario {info.number} runs no transactions, {consequence} (scenarios {takes} do)")


def _on_postgres(console: Console, play: Callable[[Workspace], Awaitable[int]], said: str = "") -> int:
    """Provision the server, say which one (and ``said``), and play in a workspace that is dropped after."""
    from lab.postgres.provision import provision, verify  # deferred: `lab list` must not pay for it

    with provision() as pg:
        console.print(pg.description, style="dim")
        if said:
            console.print(said, style="dim")

        async def journey() -> int:
            await verify(pg)
            workspace = await Workspace.open(pg.dsn)
            try:
                return await play(workspace)
            finally:
                await workspace.close()

        return _run(journey)


def workshop_command(console: Console, args: argparse.Namespace) -> int:
    """`lab exercise` and `lab check` (lab/workshop/commands.py): 0 pass, 1 fail, 2 cannot grade."""
    from lab.workshop.commands import check, exercise
    from lab.workshop.grading import Budget

    if args.command == "exercise":
        return exercise(console, scenario(args.scenario), force=args.force)
    budget = Budget(reduction=False) if args.no_reduction else None
    return check(console, scenario(args.scenario), args.file, step_timeout=args.step_timeout, budget=budget)


def isolation_matrix(console: Console, args: argparse.Namespace) -> int:
    """`lab matrix`: 0 when every cell is what lab/journeys/matrix.toml expects, 1 when one is not."""
    from lab.journeys.matrix import CellId, matrix_journey, matrix_scenarios, show_cell

    cell = CellId.parse(args.show) if args.show else None
    chosen = [scenario(s) for s in args.scenarios] or matrix_scenarios()
    for info in chosen:
        runs_transactions(info, "so it has no isolation matrix")
    if cell is not None:
        return _on_postgres(console, lambda ws: show_cell(console, ws, cell, step_timeout=args.step_timeout))
    return _on_postgres(console, lambda ws: matrix_journey(console, ws, chosen, step_timeout=args.step_timeout))


def occ_table(console: Console, clients: tuple[int, ...]) -> int:
    """Brooker's table: N clients on one row with optimistic concurrency, four backoff policies."""
    from lab.attacks.herd_occ import run_occ_table
    from lab.postgres.provision import provision, verify

    with provision() as pg:
        console.print(pg.description, style="dim")

        async def table() -> int:
            await verify(pg)
            await run_occ_table(console, pg.dsn, clients=clients)
            return 0

        return _run(table)


def _run(make: Callable[[], Awaitable[int]]) -> int:
    """Play ``make()`` on an event loop; a signal that lands while that loop is built or torn down waits."""
    from lab.postgres.provision import run_held  # deferred, as _on_postgres's import

    return run_held(make)


def _take_signals() -> None:
    """SIGINT and SIGTERM both end the lab as Ctrl-C does, whatever its parent ignored.

    A parent may leave SIGINT ignored (nohup, a script's ``cmd &``); SIGTERM, raised again as SIGINT,
    would then be ignored too, and asyncio.run only cancels its main task on SIGINT when Python's own
    handler is in place. So Python's handler is put back first.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _interrupt)  # a lost interrupt, delivered again (see below)
    sys.unraisablehook = _redeliver_lost_interrupts


def _hold_signals() -> None:
    """The outcome is decided: a signal now, while Python shuts down, must not turn 0 into "killed by SIGTERM"."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _interrupted(exc: BaseException | None) -> bool:
    """A KeyboardInterrupt, or an exception Python raised for one: a signal landing in a ``__set_name__`` (a
    module defining a class as it is imported) comes out of Python 3.11 as a RuntimeError caused by it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__
    return False


def _interrupt(_signum: int, _frame: Any) -> None:
    """Turn SIGTERM into SIGINT: inside asyncio.run that cancels the main task, so every ``finally`` runs."""
    signal.raise_signal(signal.SIGINT)


def _redeliver_lost_interrupts(unraisable: Any) -> None:
    """A KeyboardInterrupt raised where Python cannot let it out (a weakref callback of the import
    system, a ``__del__``) is printed as "Exception ignored" and lost, and the command runs on: deliver
    it again in 10 ms (SIGALRM, handled as SIGTERM), once this hook has returned. Raised here and now,
    it would land in the hook itself, and be lost for good."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        signal.setitimer(signal.ITIMER_REAL, 0.01)
    else:
        sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
    raise SystemExit(main())
