"""The isolation matrix: would REPEATABLE READ or SERIALIZABLE have saved you? Answered by running.

Every scenario whose sessions run transactions (the registry says which), its buggy handler and its
fix, goes through every interleaving of two duplicates, and every crash point where the scenario has
them, with every session at READ COMMITTED, then REPEATABLE READ, then SERIALIZABLE, then SERIALIZABLE
with the handler retried whenever PostgreSQL raises a serialization failure (40001) or a deadlock
(40P01), as a framework's retry decorator would. A cell says whether the invariant held; if not,
which anomaly broke it and in how many runs; what PostgreSQL raised to a session, and what that
session's client then saw. The provider keeps its own ledger on its own connection: no level and no
retry can take a charge back.

The table is Hermitage's (Martin Kleppmann, github.com/ept/hermitage: one row per test, one column
per isolation level, every cell found by running it), for idempotency bugs instead of textbook
anomalies. What the lab expects of each cell, and why, is committed beside this module in
``matrix.toml``: a cell that differs is reported, and makes the exit code 1.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import asyncpg
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lab.attacks.charge import ChargeLab, Progress, Request, RunOutcome, duplicates, switches
from lab.attacks.inbox import InboxLab, concurrent
from lab.contracts import Response
from lab.engine.proxy import Connector
from lab.engine.scheduler import SessionResult, current_session
from lab.engine.timeline import render
from lab.errors import LabError
from lab.journeys.shared import holds, progress_bar
from lab.postgres.workspace import ISOLATION_LEVELS, Workspace
from lab.registry import SCENARIOS, ScenarioInfo

P = ParamSpec("P")
T = TypeVar("T")

RETRIED = "serializable+retry"  # the fourth column: SERIALIZABLE, and the handler retried on 40001/40P01
COLUMNS = (*ISOLATION_LEVELS, RETRIED)
SIDES = ("buggy", "fixed")
RETRYABLE = {"40001": "serialization failure", "40P01": "deadlock detected"}  # SQLSTATEs a retry is for
ATTEMPTS = 3  # a retried request runs at most this often; the last failure reaches the client

#: How a cell names an invariant's sentence (lab/attacks/invariants.py), first match wins.
ANOMALIES = (
    (r"charged \d+ times", "double charge"),
    (r"but the key replays", "lost update"),  # the last UPDATE replaced the response a client was given
    (r"nothing to replay", "answer not stored"),
    (r"applied \d+ times", "double apply"),
    (r"never acknowledged", "message stuck"),
    (r"\blost\b", "lost event"),
    (r"not completed", "key stuck"),
)


def anomaly_name(sentence: str) -> str:
    for pattern, name in ANOMALIES:
        if re.search(pattern, sentence):
            return name
    return sentence


def matrix_scenarios() -> list[ScenarioInfo]:
    """The scenarios whose sessions run transactions, in registry order."""
    return [info for info in SCENARIOS.values() if info.isolation]


@dataclass(frozen=True)
class CellId:
    """One cell: ``3/serializable/buggy``; the column is a level or ``serializable+retry``."""

    scenario: int
    column: str
    side: str

    @classmethod
    def parse(cls, text: str) -> CellId:
        parts = text.split("/")
        numbers = [str(info.number) for info in matrix_scenarios()]
        if len(parts) != 3 or parts[0] not in numbers or parts[1] not in COLUMNS or parts[2] not in SIDES:
            raise LabError(
                f"no cell {text!r}: write SCENARIO/LEVEL/HANDLER like 3/serializable/buggy, with SCENARIO one of "
                f"{', '.join(numbers)}, LEVEL one of {', '.join(COLUMNS)}, HANDLER buggy or fixed"
            )
        return cls(int(parts[0]), parts[1], parts[2])

    def __str__(self) -> str:
        return f"{self.scenario}/{self.column}/{self.side}"

    @property
    def level(self) -> str:
        return "serializable" if self.column == RETRIED else self.column

    def describe(self) -> str:
        info = SCENARIOS[self.scenario]
        retried = f", retried on {' or '.join(RETRYABLE)}" if self.column == RETRIED else ""
        level = ISOLATION_LEVELS[self.level].upper()
        handler = f"the {self.side} handler{retried}"
        return f"scenario {self.scenario} ({info.title.lower()}), {handler}, every session at {level}"


@dataclass
class Cell:
    """What one cell's runs showed, counted per run: the invariant read from the database, the errors
    from the server."""

    id: CellId
    error_seen_as: str = "500"  # what a client makes of a handler that raised: a 500, or (the relay) no ack
    runs: int = 0
    failing: int = 0
    crash_runs: int = 0
    crash_failing: int = 0
    anomalies: Counter[str] = field(default_factory=Counter)  # anomaly -> runs it broke
    raised: Counter[str] = field(default_factory=Counter)  # SQLSTATE -> runs in which a session got it
    answers: Counter[str] = field(default_factory=Counter)  # what such a session's client saw -> runs
    smallest: RunOutcome | None = None  # the failing run with the fewest switches between sessions
    smallest_raising: RunOutcome | None = None  # the same among runs in which PostgreSQL raised 40001/40P01

    @property
    def holds(self) -> bool:
        return self.failing == 0 and self.crash_failing == 0

    def summary(self) -> str:
        """The cell without its counts, as ``matrix.toml`` states it: ``double charge · 40001 → 500``."""
        verdict = "holds" if self.holds else " + ".join(sorted(self.anomalies))
        if not self.raised:
            return verdict
        return f"{verdict} · {', '.join(sorted(self.raised))} → {' / '.join(sorted(self.answers))}"

    def counts(self) -> str:
        crashed = f", crash {self.crash_failing}/{self.crash_runs}" if self.crash_runs else ""
        return f"{self.failing}/{self.runs}{crashed}"

    def add(self, outcome: RunOutcome, raised: dict[str, set[str]], retried: set[str], *, crash: bool) -> None:
        """One run: ``raised`` maps each session to the SQLSTATEs it got, ``retried`` names those retried."""
        broke = bool(outcome.anomalies)
        if crash:
            self.crash_runs += 1
            self.crash_failing += broke
        else:
            self.runs += 1
            self.failing += broke
        self.anomalies.update({anomaly_name(sentence) for sentence in outcome.anomalies})
        self.raised.update({code for codes in raised.values() for code in codes})
        ended = {result.name: result for result in outcome.results}
        self.answers.update(self._saw(ended[s], retried=s in retried) for s in raised if s in ended)
        if broke and _simpler(outcome, self.smallest):
            self.smallest = outcome
        if raised and _simpler(outcome, self.smallest_raising):
            self.smallest_raising = outcome

    def _saw(self, result: SessionResult, *, retried: bool) -> str:
        if result.crashed:
            saw = "crash"
        elif result.error is not None:
            saw = self.error_seen_as
        elif isinstance(result.result, Response):
            saw = str(result.result.status)
        else:
            saw = str(result.result)  # the relay's word for a delivery: acked, dead-lettered
        return f"retried, {saw}" if retried else saw


def _simpler(outcome: RunOutcome, than: RunOutcome | None) -> bool:
    """Failing before holding, then fewer switches between sessions, then fewer steps."""

    def cost(run: RunOutcome) -> tuple[bool, int, int]:
        return not run.anomalies, switches(run.trace), len(run.trace.rows)

    return than is None or cost(outcome) < cost(than)


class ServerErrors:
    """The SQLSTATEs PostgreSQL raised to each session, from asyncpg's query logger on the sessions' backends.

    A handler may catch the error, or a retry hide it, so what a handler returns cannot tell: every
    backend the sessions open is watched instead, and each run's errors are drained after it.
    """

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}

    def watching(self, connect: Connector) -> Connector:
        async def watched() -> asyncpg.Connection:
            conn = await connect()
            conn.add_query_logger(self._log)
            return conn

        return watched

    def _log(self, record: Any) -> None:
        # asyncpg calls loggers with loop.call_soon from the task that ran the query, so in the session's
        # context; the call lands before the run's invariant is read, which awaits the server.
        code = getattr(record.exception, "sqlstate", None)
        if code in RETRYABLE and (session := current_session()) is not None:
            self._seen.setdefault(session, set()).add(code)

    def drain(self) -> dict[str, set[str]]:
        seen, self._seen = self._seen, {}
        return seen


class Retry:
    """Runs a handler again when PostgreSQL raises 40001 or 40P01, as a framework's retry decorator does.

    PostgreSQL's manual asks for this at REPEATABLE READ and SERIALIZABLE, and for retrying "the
    complete transaction, including all logic that decides which SQL to issue" (13.5, Serialization
    Failure Handling): so the whole request is run again. What no retry can undo is a call to the
    outside world that the failed attempt already made.
    """

    def __init__(self, attempts: int = ATTEMPTS) -> None:
        self.attempts = attempts
        self._retried: set[str] = set()

    def wrap(self, handler: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        async def retried(*args: P.args, **kwargs: P.kwargs) -> T:
            for _ in range(self.attempts - 1):
                try:
                    return await handler(*args, **kwargs)
                except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
                    self._retried.add(current_session() or "")
            return await handler(*args, **kwargs)

        return retried

    def drain(self) -> set[str]:
        retried, self._retried = self._retried, set()
        return retried


async def explore_cell(
    console: Console, workspace: Workspace, cell_id: CellId, *, step_timeout: float = 5.0, label: str = ""
) -> Cell:
    """Every interleaving of two duplicates, and every crash point, of one handler with every session at one level."""
    info = SCENARIOS[cell_id.scenario]
    module = info.module(cell_id.side)
    errors = ServerErrors()
    retry = Retry() if cell_id.column == RETRIED else None
    cell = Cell(cell_id, error_seen_as="no ack" if info.contract == "handle_event" else "500")

    def observer(*, crash: bool) -> Callable[[RunOutcome], None]:
        def observe(outcome: RunOutcome) -> None:
            cell.add(outcome, errors.drain(), retry.drain() if retry else set(), crash=crash)

        return observe

    def wrap(handler: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        return retry.wrap(handler) if retry else handler

    attacks = {"handle_charge": _charge_attacks, "handle_event": _inbox_attacks}
    if info.contract not in attacks:
        raise LabError(f"scenario {info.number}: the matrix has no attack on {info.contract}")
    sessions = errors.watching(workspace.sessions(cell_id.level))
    with progress_bar(console, label or str(cell_id), None) as tick:
        await attacks[info.contract](workspace, info, module, sessions, wrap, tick, observer, step_timeout)
    return cell


Wrap = Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]
Observers = Callable[..., Callable[[RunOutcome], None]]


async def _charge_attacks(
    workspace: Workspace, info: ScenarioInfo, module: Any, sessions: Connector, wrap: Wrap, tick: Progress,
    observer: Observers, step_timeout: float,
) -> None:
    """What ``lab run N --explore --crash`` does to a charge endpoint: two duplicates, then the crash points."""
    attack = getattr(info.module("buggy"), "CRASH", None)
    async with ChargeLab(workspace, module.INVARIANT, step_timeout=step_timeout, connect=sessions) as lab:
        await lab.install(module)
        handler = wrap(module.handle_charge)
        # Every interleaving, not one per class: the matrix counts runs that raised 40001 among all of them.
        await lab.explore(handler, duplicates(2), tick, observer(crash=False), reduction=False)
        if attack is not None:
            await lab.crash_points(
                handler, duplicates(1), [Request("T2")], pause=attack.retry_after, invariant=attack.invariant,
                progress=tick, observe=observer(crash=True),
            )


async def _inbox_attacks(
    workspace: Workspace, info: ScenarioInfo, module: Any, sessions: Connector, wrap: Wrap, tick: Progress,
    observer: Observers, step_timeout: float,
) -> None:
    """What ``lab run 4 --explore`` does to an inbox consumer: two deliveries at once, then every crash point."""
    async with InboxLab(workspace, module.INVARIANT, step_timeout=step_timeout, connect=sessions) as lab:
        await lab.install(module)
        handler = wrap(module.handle_event)
        await lab.explore(handler, concurrent(2), tick, observer(crash=False), reduction=False)
        await lab.crash_everywhere(handler, progress=tick, observe=observer(crash=True))


# -- what the lab expects, and the table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One row of ``matrix.toml``: a handler's expected cell in each column, and why, in one sentence."""

    scenario: int
    side: str
    cells: dict[str, str]
    why: str


def claims() -> dict[tuple[int, str], Claim]:
    """The committed expectations, by (scenario, handler)."""
    text = resources.files("lab.journeys").joinpath("matrix.toml").read_text(encoding="utf-8")
    rows = {}
    for row, entry in tomllib.loads(text).items():
        number, side = row.split("/")
        cells = {column: entry[column] for column in COLUMNS}
        rows[int(number), side] = Claim(int(number), side, cells, " ".join(entry["why"].split()))
    return rows


def expected(cell: Cell, known: dict[tuple[int, str], Claim]) -> str | None:
    claim = known.get((cell.id.scenario, cell.id.side))
    return claim.cells.get(cell.id.column) if claim else None


def cell_text(cell: Cell, claim: str | None) -> Text:
    """A cell as the table shows it: the verdict, the counts, what PostgreSQL raised and the client saw."""
    text = Text()
    if cell.holds:
        text.append("✓ holds", style="bold green")
    else:
        names = sorted(cell.anomalies)
        shown = [f"{name} {cell.anomalies[name]}" for name in names] if len(names) > 1 else names
        text.append("✗ " + "\n  ".join(shown), style="bold red")
    text.append(f"\n{cell.counts()}", style="dim")
    if cell.raised:
        codes = ", ".join(f"{code} in {runs}" for code, runs in sorted(cell.raised.items()))
        text.append(f"\n{codes} → {' / '.join(sorted(cell.answers))}", style="yellow")
    if claim is not None and claim != cell.summary():
        text.append(f"\n≠ expected: {claim}", style="bold magenta")
    return text


def column_title(column: str) -> str:
    level = ISOLATION_LEVELS["serializable" if column == RETRIED else column].upper()
    return f"{level},\nretried on 40001" if column == RETRIED else level


def matrix_table(cells: Sequence[Cell], known: dict[tuple[int, str], Claim]) -> Table:
    """Hermitage's summary table: a row per scenario and handler, a column per isolation level."""
    table = Table(title="isolation matrix: which level keeps the invariant?", title_justify="left")
    table.add_column("scenario")
    table.add_column("handler")
    for column in COLUMNS:
        table.add_column(column_title(column))
    rows: dict[tuple[int, str], dict[str, Cell]] = {}
    for cell in cells:
        rows.setdefault((cell.id.scenario, cell.id.side), {})[cell.id.column] = cell
    named = set()
    for (number, side), by_column in rows.items():
        name = "" if number in named else f"{number} {SCENARIOS[number].title.lower()}"
        named.add(number)
        shown = [by_column.get(column) for column in COLUMNS]
        table.add_row(name, side, *[cell_text(c, expected(c, known)) if c else "" for c in shown])
    return table


LEGEND = (
    "n/m: runs that broke the invariant, of the runs explored: every interleaving of two duplicates, and "
    "(crash) one session crashed at each of its step boundaries, then the client's retry or the relay's "
    "redelivery. 40001 serialization failure, 40P01 deadlock: in how many runs PostgreSQL raised it to a "
    "session, → what that session's client saw in the end (500: the handler raised; no ack: the relay will "
    "deliver again). lab matrix --show N/LEVEL/HANDLER prints a cell's smallest failing run."
)


async def matrix_journey(
    console: Console, workspace: Workspace, scenarios: Sequence[ScenarioInfo], *, step_timeout: float = 5.0
) -> int:
    """Every cell of the scenarios' rows, the table, and why each row is what it is; 1 when a cell surprised."""
    known = claims()
    clock = asyncio.get_running_loop().time
    started = clock()
    ids = [CellId(info.number, column, side) for info in scenarios for side in SIDES for column in COLUMNS]
    cells = [
        await explore_cell(console, workspace, cell_id, step_timeout=step_timeout, label=f"{n}/{len(ids)} {cell_id}")
        for n, cell_id in enumerate(ids, 1)
    ]
    seconds = clock() - started
    console.print(matrix_table(cells, known))
    console.print(LEGEND, style="dim")
    console.print()
    for info in scenarios:
        for side in SIDES:
            if claim := known.get((info.number, side)):
                console.print(Text.assemble((f"{info.number} {side}: ", "bold"), claim.why))
    console.print()
    runs = sum(cell.runs + cell.crash_runs for cell in cells)
    console.print(f"{len(cells)} cells, {runs:,} runs, {seconds:.1f} s", style="dim")
    surprises = [cell for cell in cells if expected(cell, known) != cell.summary()]
    for cell in surprises:
        console.print(_surprise(cell, expected(cell, known)))
    return 1 if surprises else 0


async def show_cell(console: Console, workspace: Workspace, cell_id: CellId, *, step_timeout: float = 5.0) -> int:
    """One cell explored, and its smallest failing run as a timeline; and the smallest that raised 40001 or 40P01."""
    cell = await explore_cell(console, workspace, cell_id, step_timeout=step_timeout)
    promise = holds(SCENARIOS[cell_id.scenario].module(cell_id.side))
    console.print(Text.assemble((f"{cell_id}: ", "bold"), cell_id.describe()))
    console.print(cell_text(cell, None))
    console.print()
    shown = [(cell.smallest, "the smallest failing run")]
    if cell.smallest_raising is not cell.smallest:
        failing = "failing " if cell.smallest_raising and cell.smallest_raising.anomalies else ""
        shown.append((cell.smallest_raising, f"the smallest {failing}run in which PostgreSQL raised it"))
    for run, what in shown:
        if run is not None:
            title = f"{cell_id}: {what} ({_plural(switches(run.trace), 'switch', 'es')} between sessions)"
            console.print(render(run.trace, run.results, run.anomalies, holds=promise, title=title))
            console.print()
    claim = expected(cell, claims())
    if claim != cell.summary():
        console.print(_surprise(cell, claim))
        return 1
    return 0


def _surprise(cell: Cell, claim: str | None) -> Text:
    return Text.assemble(
        ("unexpected ", "bold red"), f"{cell.id}: {cell.summary()} (lab/journeys/matrix.toml expects {claim})"
    )


def _plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n} {word}{'' if n == 1 else suffix}"
