"""``make bench``: the lab's speed, every figure printed beside the floor it is compared to.

A ratio against a floor measured in the same run on the same machine is what we track, not an
absolute time: a loaded laptop slows both sides alike. Each figure is the median of ``--runs`` runs,
interleaved (round 1 of everything, then round 2, ...) so that a burst of load from elsewhere hits
every figure a little rather than one figure a lot. The results also go to ``bench/results.json``.

The floors:
- start-up: ``pg_ctl start`` of the same binaries, with the same settings, as the same user, on a
  directory initialised beforehand (outside the timing), waiting on the ``ready`` line of
  postmaster.pid that ``pg_ctl -w`` reads, polled every millisecond rather than pg_ctl's 100 ms;
- exploration: the very statements each explored schedule sent (recorded by a rig built from the
  same parts: bank, scheduler, provider), replayed one at a time on the same kind of backends with
  nothing in between, reset and invariant check included;
- stress: one trial's statements, recorded the same way and replayed one at a time, so a ratio
  under 1 is the trial's concurrency paying off;
- the fixes' price: ``pgbench`` running the very statements the handler sent (recorded from one
  request through asyncpg's query logger) at the same 8 clients, next to what asyncpg alone reaches;
- virtual time: bare tasks taking as many virtual sleeps on the same loop, with no provider;
- reduction: the same exploration without the partial-order reduction (``--no-reduction``): every
  interleaving, where the reduced search runs one per class of equivalent ones. Past ``full_cap``
  interleavings (a random-walk estimate) the full search is not run and the row says so.

The bench always starts the embedded server, even when ``LAB_DATABASE_URL`` is set: start-up and
pgbench need the binaries, and the floors must run on the server the figures ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
from rich.console import Console
from rich.table import Table

from lab.attacks.charge import BODY, ChargeLab, Exploration, Request, duplicates
from lab.attacks.inbox import InboxLab, concurrent
from lab.attacks.provider import Provider, release_as_is
from lab.contracts import Event
from lab.engine.proxy import ConnectionBank
from lab.engine.scheduler import ScheduleError
from lab.engine.schedules import DepthFirst, estimate_runs
from lab.postgres.provision import INITDB_ARGS, PREFIX, SETTINGS, provision, run_parent
from lab.postgres.workspace import Workspace
from lab.registry import SCENARIOS, ScenarioInfo

EMBEDDED = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}  # neither a user's URL nor Docker: our binaries
CLIENTS = 8
STRESS_TRIALS = {2: 60, 10: 30, 100: 6}
KEY_MARK = "benchkey"  # the recorded request's key; in the pgbench script it becomes a random one


@dataclass
class Figure:
    """One row: samples of a figure and of its floor, and which way is better."""

    key: str
    section: str
    label: str
    unit: str  # "s", "ms", or a rate such as "schedules/s"
    floor_label: str = ""
    samples: list[float] = field(default_factory=list)
    floor_samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def rate(self) -> bool:
        return "/s" in self.unit

    @property
    def value(self) -> float:
        return statistics.median(self.samples)

    @property
    def floor(self) -> float | None:
        return statistics.median(self.floor_samples) if self.floor_samples else None

    @property
    def ratio(self) -> float | None:
        """How many times the floor's cost this figure costs (above 1: slower than the floor)."""
        floor = self.floor
        if floor is None or floor <= 0 or self.value <= 0:
            return None
        return floor / self.value if self.rate else self.value / floor


class Bench:
    """The figures of one bench run, added to round by round."""

    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}

    def figure(self, key: str, section: str, label: str, unit: str, floor_label: str = "") -> Figure:
        if key not in self.figures:
            self.figures[key] = Figure(key, section, label, unit, floor_label)
        return self.figures[key]


@dataclass(frozen=True)
class Settings:
    runs: int = 3
    seconds: float = 1.0  # each client loop; pgbench runs at least 1 s (its -T takes whole seconds)
    stress_trials: dict[int, int] = field(default_factory=lambda: dict(STRESS_TRIALS))
    explore_cap: int = 400  # schedules per measurement: all of scenario 1's (270 at most)
    startup: bool = True
    reduction: tuple[tuple[int, int, str], ...] = (  # (scenario, sessions, sides) with and without the reduction
        *((n, sessions, "buggy fixed") for sessions in (2, 3) for n in (1, 3, 4)), (1, 4, "fixed"),
    )
    full_cap: int = 12_000  # the full search is run only when a random-walk estimate says at most this many

    @classmethod
    def quick(cls) -> Settings:
        return cls(runs=1, seconds=0.3, stress_trials={2: 10, 10: 5, 100: 2}, explore_cap=40,
                   reduction=((1, 2, "buggy fixed"), (4, 2, "buggy fixed")), full_cap=200)


# -- start-up -----------------------------------------------------------------------------------------


REPO = Path(__file__).resolve().parent.parent


def time_lab_run_1() -> tuple[str, float]:
    """Wall time of ``make scenario-1`` with the venv present, as a user runs it again: make, interpreter,
    imports, Postgres, journey, clean-up. Only when this interpreter is the repository's .venv (else make
    would build one); otherwise ``lab run 1`` alone, which is all of that but make."""
    env = {k: v for k, v in os.environ.items() if k not in ("LAB_DATABASE_URL", "MAKEFLAGS", "MAKELEVEL")} | EMBEDDED
    argv = [sys.executable, "-m", "lab.cli", "run", "1"]
    what = "lab run 1"
    if Path(sys.prefix).resolve() == REPO / ".venv" and (REPO / ".venv" / ".installed").is_file():
        argv, what = ["make", "--no-print-directory", "-C", str(REPO), "scenario-1"], "make scenario-1, venv present"
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{what} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return what, elapsed


def time_imports() -> float:
    """Interpreter start-up and the imports ``lab run 1`` needs before it does anything."""
    started = time.perf_counter()
    imports = "import lab.cli, lab.journeys.charge, lab.postgres.provision, lab.postgres.workspace"
    subprocess.run([sys.executable, "-c", imports], check=True)
    return time.perf_counter() - started


def time_provision(cold: bool = False) -> float:
    """What ``provision()`` costs before the lab can connect: stale-dir sweep, the data directory (a copy
    of the cached template; ``cold``: initdb, and saving the template, as a lab's very first start
    does, in a cache dir of its own so the user's template is left alone), start, ready."""
    with contextlib.ExitStack() as stack:
        if cold:
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="lab-bench-cache-"))
            stack.enter_context(_environ("XDG_CACHE_HOME", cache))  # platformdirs reads it at each call
        started = time.perf_counter()
        with provision(EMBEDDED):
            elapsed = time.perf_counter() - started
    return elapsed


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


class PgCtl:
    """The start-up floor: the same binaries, as the same user, on a directory initialised beforehand."""

    def __init__(self) -> None:
        from lab.postgres.provision import _binaries_reachable, _find_bindir, _version, _world_readable_copy

        self.bindir = _find_bindir()
        self.ids: dict[str, Any] = {}
        if os.geteuid() == 0:  # as lab/postgres/provision.py does: initdb refuses root, so nobody runs the server
            nobody = pwd.getpwnam("nobody")
            self.ids = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            if not _binaries_reachable(self.bindir):
                self.bindir = _world_readable_copy(self.bindir, _version(self.bindir))
        # PREFIX and lab.pid: if the bench is SIGKILLed, the next lab reaps this dir and its postmaster.
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}bench-", dir=run_parent()))  # where the lab's goes
        (self.root / "lab.pid").write_text(str(os.getpid()))
        self.data, self.sock = self.root / "data", self.root / "sock"

    def initdb(self) -> None:
        self.sock.mkdir()
        if self.ids:
            for path in (self.root, self.sock):
                os.chown(path, self.ids["user"], self.ids["group"])
        argv = [str(self.bindir / "initdb"), "-D", str(self.data), *INITDB_ARGS]  # as the lab's template was made
        subprocess.run(argv, cwd=self.root, capture_output=True, check=True, **self.ids)
        settings = SETTINGS | {"unix_socket_directories": str(self.sock)}
        with (self.data / "postgresql.auto.conf").open("a") as conf:
            conf.writelines(f"{name} = '{value}'\n" for name, value in settings.items())

    def start_s(self) -> float:
        pidfile = self.data / "postmaster.pid"
        started = time.perf_counter()
        self._pg_ctl("start", "-W", "-l", str(self.root / "postgres.log"))
        deadline = started + 15
        while time.perf_counter() < deadline:
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    elapsed = time.perf_counter() - started
                    self._pg_ctl("stop", "-m", "fast")
                    return elapsed
            time.sleep(0.001)
        self._pg_ctl("stop", "-m", "immediate")
        raise RuntimeError(f"pg_ctl start: not ready after 15 s; see {self.root / 'postgres.log'}")

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), *args], cwd=self.root,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, **self.ids,
        )  # fmt: skip

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def bench_startup(bench: Bench, settings: Settings) -> None:
    floor = "pg_ctl start, initialised dir"
    time_provision()  # the first start on a machine makes the template; every figure below is a later start
    run = bench.figure("startup.lab_run_1", "start-up", "lab run 1, end to end", "s")
    imports = bench.figure("startup.imports", "start-up", "  of which python and imports", "s")
    prov = bench.figure("startup.provision", "start-up", "  of which provision()", "s", floor)
    cold = bench.figure("startup.provision_cold", "start-up", "provision(), a machine's first (initdb)", "s", floor)
    for _ in range(settings.runs):
        run.label, run_s = time_lab_run_1()
        run.samples.append(run_s)
        imports.samples.append(time_imports())
        prov.samples.append(time_provision())
        cold.samples.append(time_provision(cold=True))
        pg_ctl = PgCtl()
        try:
            pg_ctl.initdb()
            for _ in range(2):  # it is short: two samples a round
                prov.floor_samples.append(pg_ctl.start_s())
        finally:
            pg_ctl.close()
    cold.floor_samples = prov.floor_samples
    rest = run.value - imports.value - prov.value
    run.note = f"{rest:.2f} s of it is the journey (timeline, interleavings, stress) and clean-up"
    imports.note = f"{imports.value / run.value:.0%} of the whole"
    prov.note = f"{prov.value / run.value:.0%} of the whole; a copy of the cached template"
    cold.note = "initdb, then the template saved for every later start"


# -- a side of a scenario: a workspace, a warm ChargeLab, and a rig that records what it sends -------

Statement = tuple[asyncpg.Connection, str, tuple[Any, ...]]


class Side:
    """One scenario module in its own workspace: the lab's own ``ChargeLab``, whose speed is measured,
    and a rig built from the same parts (bank, provider, scheduler) whose connections log every
    statement, so that a floor can send exactly the same statements again with nothing in between.
    """

    def __init__(self, info: ScenarioInfo, side: str, workspace: Workspace, module: Any) -> None:
        self.info, self.side, self.workspace, self.module = info, side, workspace, module
        self._recording: list[Statement] | None = None
        self.bank = ConnectionBank(self._connect)
        self.pool: asyncpg.Pool | None = None
        self.monitor: asyncpg.Connection | None = None
        self.lab: ChargeLab | None = None
        self._stand_ins: dict[int, asyncpg.Connection] = {}
        self._loggers: dict[asyncpg.Connection, Callable[[asyncpg.connection.LoggedQuery], None]] = {}

    @property
    def name(self) -> str:
        return f"s{self.info.number}.{self.side}"

    def _logged(self, conn: asyncpg.Connection) -> asyncpg.Connection:
        """Give the rig's connection a query logger, attached only while recording (it costs a loop turn)."""

        def log(record: asyncpg.connection.LoggedQuery) -> None:
            if self._recording is not None:
                self._recording.append((conn, record.query, tuple(record.args or ())))

        self._loggers[conn] = log
        if self._recording is not None:
            conn.add_query_logger(log)
        return conn

    async def _connect(self) -> asyncpg.Connection:
        return self._logged(await self.workspace.connect())

    async def _init_pool_conn(self, conn: asyncpg.Connection) -> None:
        self._logged(conn)

    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(
            self.workspace.dsn, min_size=CLIENTS, max_size=CLIENTS, init=self._init_pool_conn, reset=release_as_is,
            server_settings={"application_name": "lab-provider"},
        )  # fmt: skip
        self.monitor = await self.workspace.connect()
        await self.workspace.install(self.module.SCHEMA, getattr(self.module, "SEED", ""))
        if self.info.contract == "handle_charge":
            self.lab = ChargeLab(  # latency 0: the lab's own cost; connectors that log what it sends
                self.workspace, self.module.INVARIANT, network_latency=0.0,
                connect=self._connect, pool_init=self._init_pool_conn,
            )  # fmt: skip
            await self.lab.__aenter__()

    async def shed(self) -> None:
        """Drop every session backend (a hundred a side after stress at 100); the next run reconnects."""
        await self.bank.close()
        if self.lab is not None:
            await self.lab.__aexit__(None, None, None)
            await self.lab.__aenter__()

    async def close(self) -> None:
        if self.lab is not None:
            await self.lab.__aexit__(None, None, None)
        await self.bank.close()
        if self.pool is not None:
            await self.pool.close()
        if self.monitor is not None:
            await self.monitor.close()
        for conn in self._stand_ins.values():
            await conn.close()

    def request(self, n: int) -> Callable[[Any], Awaitable[Any]]:
        """One request with a key (or event id) no other request used; called with the client's db."""
        assert self.pool is not None
        provider = Provider(self.pool, self.workspace.ledger)
        unique = f"{KEY_MARK}{n}"
        if self.info.contract == "handle_event":
            # The sku of the inbox attacks' event, a seeded row: every bench event reserves it (one hot row).
            sku: str = importlib.import_module("lab.attacks.inbox").E1.sku
            event = Event(unique, sku, 1)
            return lambda db: self.module.handle_event(db, event)
        return lambda db: self.module.handle_charge(db, provider, unique, BODY)

    async def recorded(self, work: Awaitable[Any]) -> list[Statement]:
        """The statements ``work`` sends, in the order they completed."""
        self._loggers = {conn: log for conn, log in self._loggers.items() if not conn.is_closed()}
        for conn, log in self._loggers.items():
            conn.add_query_logger(log)
        self._recording = []
        try:
            await work
            for _ in range(3):  # asyncpg hands records to loggers with call_soon: let the last ones land
                await asyncio.sleep(0)
        finally:
            recorded, self._recording = self._recording, None
            for conn, log in self._loggers.items():
                conn.remove_query_logger(log)
        return recorded

    async def one_request(self) -> list[Statement]:
        """The statements of one request with a fresh key: what the pgbench script sends."""
        await self.workspace.reset()
        db = await self.bank.db_for("recorder", None)
        return await self.recorded(self.request(0)(db))

    async def scheduled_run(self, requests: Sequence[Request], chooser: DepthFirst) -> list[Statement]:
        """The statements one ``ChargeLab.run`` sent (sessions and provider; not reset or the invariant)."""
        assert self.lab is not None
        return await self.recorded(self.lab.run(self.module.handle_charge, list(requests), chooser))

    async def stress_trial(self, requests: Sequence[Request]) -> list[Statement]:
        """The statements one ``ChargeLab.stress`` trial sent."""
        assert self.lab is not None
        return await self.recorded(self.lab.stress(self.module.handle_charge, len(requests), 1))

    async def replay(self, statements: Sequence[Statement], requests: Sequence[Request]) -> float:
        """The floor: reset, the same statements on the same backends one at a time, the invariant."""
        started = time.perf_counter()
        await self.workspace.reset()
        for conn, sql, args in statements:
            if conn.is_closed():  # shed since it was recorded: a stand-in plays its part
                if id(conn) not in self._stand_ins:
                    self._stand_ins[id(conn)] = await self.workspace.connect()
                conn = self._stand_ins[id(conn)]
            with contextlib.suppress(asyncpg.PostgresError):  # the run saw the same errors
                await conn.execute(sql, *args)
        await self.module.INVARIANT(self.workspace, requests)
        return time.perf_counter() - started


@contextlib.asynccontextmanager
async def opened(sides: list[Side]) -> AsyncIterator[list[Side]]:
    try:
        for side in sides:
            await side.open()
        yield sides
    finally:
        for side in sides:
            await side.close()
            await side.workspace.close()


# -- exploration and stress -----------------------------------------------------------------------


async def explore_rate(side: Side, sessions: int, cap: int) -> tuple[int, float]:
    """Interleavings per second, through the same ``ChargeLab.run`` and ``DepthFirst`` as ``lab run``."""
    assert side.lab is not None
    requests, runs = duplicates(sessions), 0
    chooser: DepthFirst | None = DepthFirst()
    started = time.perf_counter()
    while chooser is not None and runs < cap:
        await side.lab.run(side.module.handle_charge, requests, chooser)
        runs += 1
        chooser = chooser.next()
    return runs, time.perf_counter() - started


async def explored_statements(side: Side, sessions: int, cap: int) -> list[list[Statement]]:
    """Every interleaving the lab explores, each as the statements it sent (the rig walks the same tree)."""
    requests, found = duplicates(sessions), list[list[Statement]]()
    chooser: DepthFirst | None = DepthFirst()
    while chooser is not None and len(found) < cap:
        found.append(await side.scheduled_run(requests, chooser))
        chooser = chooser.next()
    return found


async def bench_explore(bench: Bench, side: Side, sessions: int, recorded: list[list[Statement]]) -> None:
    fig = bench.figure(
        f"explore.{side.name}.{sessions}", "exploration",
        f"s{side.info.number} {side.side}, {sessions} sessions", "schedules/s",
        "the same statements replayed, no scheduler",
    )  # fmt: skip
    runs, seconds = await explore_rate(side, sessions, len(recorded))
    fig.samples.append(runs / seconds)
    requests = duplicates(sessions)
    floor = sum([await side.replay(statements, requests) for statements in recorded])
    fig.floor_samples.append(len(recorded) / floor)
    per = statistics.mean(len(s) for s in recorded)
    each, against = 1000 / fig.value, 1000 / (fig.floor or 1)
    fig.note = f"{runs} schedules of {per:.0f} statements: {each:.1f} ms each against {against:.1f}"


async def bench_stress(bench: Bench, side: Side, concurrency: int, settings: Settings) -> None:
    assert side.lab is not None
    fig = bench.figure(
        f"stress.{side.name}.{concurrency}", "stress", f"s{side.info.number} {side.side}, concurrency {concurrency}",
        "trials/s", "the same statements replayed one at a time",
    )  # fmt: skip
    handler = side.module.handle_charge
    await side.lab.stress(handler, concurrency, 1)  # connects the sessions' backends, outside the timing
    trials = settings.stress_trials[concurrency]
    result = await side.lab.stress(handler, concurrency, trials)
    fig.samples.append(result.trials / result.seconds)
    requests = duplicates(concurrency)
    floors = []
    for _ in range(3):
        statements = await side.stress_trial(requests)
        floors.append(await side.replay(statements, requests))
    fig.floor_samples.append(1 / statistics.median(floors))
    fig.note = f"{trials} trials a run"
    if concurrency >= 100:
        await side.shed()  # two sides holding 200 backends each would pass max_connections


# -- the fixes' price: 8 clients through asyncpg, against pgbench on the same statements -------------


async def looping_clients(
    clients: Sequence[Any], seconds: float, one: Callable[[Any, int], Awaitable[Any]]
) -> tuple[float, list[float]]:
    """Each client calls ``one(client, n)`` with a fresh ``n`` until ``seconds`` pass; throughput, latencies (ms)."""
    latencies: list[float] = []
    counter = iter(range(1, 1 << 62))
    started = time.perf_counter()
    deadline = started + seconds

    async def loop(client: Any) -> None:
        while (now := time.perf_counter()) < deadline:
            await one(client, next(counter))
            latencies.append((time.perf_counter() - now) * 1000)

    await asyncio.gather(*(loop(client) for client in clients))
    return len(latencies) / (time.perf_counter() - started), latencies


async def handler_clients(side: Side, seconds: float) -> tuple[float, list[float]]:
    """``CLIENTS`` clients through the scheduler-less proxy, each request with a key never used before."""
    await side.workspace.reset()
    dbs = [await side.bank.db_for(f"C{i}", None) for i in range(1, CLIENTS + 1)]
    return await looping_clients(dbs, seconds, lambda db, n: side.request(n)(db))


def pgbench_script(statements: Sequence[Statement]) -> str:
    """The recorded statements as a pgbench script, the recorded key replaced by a random one.

    Parameters become literals; the key, wherever it appears inside one, becomes ``:n`` (which
    ``-M prepared`` sends as a bound parameter, as asyncpg does).
    """
    lines = ["\\set n random(1, 1000000000000)"]
    for _, sql, args in statements:

        def literal(m: re.Match[str], args: tuple[Any, ...] = args) -> str:
            return _literal(args[int(m.group(1)) - 1])

        lines.append(re.sub(r"\$(\d+)", literal, " ".join(sql.split())).rstrip(";") + ";")
    return "\n".join(lines) + "\n"


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "ARRAY[" + ", ".join(_literal(v) for v in value) + "]"
    text = value.decode() if isinstance(value, bytes) else str(value)
    pieces = re.split(rf"{KEY_MARK}\d+", text)
    if len(pieces) == 1:
        return _quote(text)
    tokens = [_quote(piece) for piece in pieces[:1] if piece]
    for piece in pieces[1:]:
        tokens += [_quote(KEY_MARK), ":n", *([_quote(piece)] if piece else [])]
    return "(" + " || ".join(tokens) + ")"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run_pgbench(dsn: str, schema: str, script: str, seconds: float, workdir: Path) -> tuple[float, list[float]]:
    """pgbench at ``CLIENTS`` clients on the server the handlers ran on; tps and per-transaction latencies (ms)."""
    from lab.postgres.provision import _find_bindir

    query = parse_qs(urlsplit(dsn).query)
    (workdir / "script.sql").write_text(script)
    for old in workdir.glob("pgbench_log*"):
        old.unlink()
    argv = [
        str(_find_bindir() / "pgbench"), "-n", "-M", "prepared", "-c", str(CLIENTS), "-j", "2",
        "-T", str(max(1, round(seconds))), "-f", "script.sql", "-l", "--log-prefix", "pgbench_log",
        "-h", query["host"][0], "-p", query.get("port", ["5432"])[0], "-U", "postgres", "postgres",
    ]  # fmt: skip
    env = os.environ | {"PGOPTIONS": f"-c search_path={schema}"}
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (m := re.search(r"tps = ([\d.]+)", done.stdout)):
        raise RuntimeError(f"pgbench failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-400:]}")
    latencies = [
        int(line.split()[2]) / 1000 for log in workdir.glob("pgbench_log*") for line in log.read_text().splitlines()
    ]
    return float(m.group(1)), latencies


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_price(bench: Bench, fixed: Side, buggy: Side | None, settings: Settings, workdir: Path) -> None:
    what = "consumer" if fixed.info.contract == "handle_event" else "charge"
    label = f"s{fixed.info.number} fixed {what}"
    floor = f"pgbench, same statements, {CLIENTS} clients"
    key = f"price.{fixed.name}"
    tput = bench.figure(f"{key}.throughput", "the fixes' price", f"{label}, {CLIENTS} clients", "requests/s", floor)
    p50 = bench.figure(f"{key}.p50", "the fixes' price", f"{label}, p50 latency", "ms", floor)
    p99 = bench.figure(f"{key}.p99", "the fixes' price", f"{label}, p99 latency", "ms", floor)
    rate, latencies = await handler_clients(fixed, settings.seconds)
    tput.samples.append(rate)
    p50.samples.append(_percentile(latencies, 0.50))
    p99.samples.append(_percentile(latencies, 0.99))
    statements = await fixed.one_request()
    await fixed.workspace.reset()
    tps, pg_latencies = await asyncio.to_thread(
        run_pgbench, fixed.workspace.dsn, fixed.workspace.schema, pgbench_script(statements),
        settings.seconds, workdir,
    )  # fmt: skip
    tput.floor_samples.append(tps)
    p50.floor_samples.append(_percentile(pg_latencies, 0.50))
    p99.floor_samples.append(_percentile(pg_latencies, 0.99))
    tput.note = f"{len(statements)} statements a request"
    if buggy is not None:
        against = bench.figure(
            f"{key}.vs_buggy", "the fixes' price", f"{label} against the buggy one", "requests/s",
            f"buggy handler, {CLIENTS} clients",
        )  # fmt: skip
        buggy_rate, _ = await handler_clients(buggy, settings.seconds)
        against.samples.append(rate)
        against.floor_samples.append(buggy_rate)
        against.note = f"buggy: {len(await buggy.one_request())} statements a request"


async def bench_driver(bench: Bench, side: Side, settings: Settings, workdir: Path) -> None:
    """What asyncpg alone achieves with one statement a request: the ceiling any handler here lives under."""
    fig = bench.figure(
        "price.asyncpg_alone", "the fixes' price", f"asyncpg alone, one SELECT, {CLIENTS} clients", "requests/s",
        f"pgbench, the same SELECT, {CLIENTS} clients",
    )  # fmt: skip
    conns = [await side.workspace.connect() for _ in range(CLIENTS)]
    try:
        one = "SELECT $1::int"
        rate, _ = await looping_clients(conns, settings.seconds, lambda conn, n: conn.fetchval(one, n))
    finally:
        for conn in conns:
            await conn.close()
    fig.samples.append(rate)
    script = "\\set n random(1, 1000000)\nSELECT :n::int;\n"
    tps, _ = await asyncio.to_thread(
        run_pgbench, side.workspace.dsn, side.workspace.schema, script, settings.seconds, workdir
    )
    fig.floor_samples.append(tps)


# -- virtual time -----------------------------------------------------------------------------------


def bench_virtual(bench: Bench, settings: Settings, clients: int = 1000) -> bool:
    """Clients per second in the retry herd, if scenario 2 exposes its benchmark helper."""
    try:
        from lab.attacks.herd import bench_virtual_time
    except ImportError:
        return False
    fig = bench.figure(
        "virtual.herd", "virtual time", f"retry herd, {clients} clients", "clients/s",
        f"{clients} bare tasks × 6 virtual sleeps",
    )  # fmt: skip
    for _ in range(settings.runs):
        fig.samples.append(bench_virtual_time(clients=clients))
        fig.floor_samples.append(_bare_virtual(clients))
    fig.note = "slower of buggy and fixed"
    return True


def _bare_virtual(clients: int) -> float:
    """The loop's own cost for the herd's timers: every client sleeping as often as it retries."""
    import random

    from lab.engine.virtual_time import run_virtual

    async def herd() -> None:
        async def client() -> None:
            for _ in range(6):
                await asyncio.sleep(random.uniform(0, 1))

        await asyncio.gather(*(client() for _ in range(clients)))

    started = time.perf_counter()
    run_virtual(herd, seed=1)
    return clients / (time.perf_counter() - started)


# -- partial-order reduction ---------------------------------------------------------------------


async def bench_reduction(bench: Bench, dsn: str, settings: Settings, console: Console) -> None:
    """Each (scenario, sessions), buggy and fixed: the reduced search, then the full one where it is short enough."""
    workspace = await Workspace.open(dsn)
    try:
        for number, sessions, sides in settings.reduction:
            info = SCENARIOS[number]
            for side in sides.split():
                module = info.module(side)
                console.print(f"[dim]reduction: s{number} {side}, {sessions} sessions[/]")
                if info.contract == "handle_event":
                    async with InboxLab(workspace, module.INVARIANT) as inbox:
                        await inbox.install(module)
                        explore = partial(inbox.explore, module.handle_event, concurrent(sessions))
                        walk = partial(inbox.run, module.handle_event, concurrent(sessions))
                        await _reduction_row(bench, settings, f"s{number} {side}", sessions, explore, walk)
                else:
                    async with ChargeLab(workspace, module.INVARIANT) as charge:
                        await charge.install(module)
                        explore = partial(charge.explore, module.handle_charge, duplicates(sessions))
                        walk = partial(charge.run, module.handle_charge, duplicates(sessions))
                        await _reduction_row(bench, settings, f"s{number} {side}", sessions, explore, walk)
    finally:
        await workspace.close()


async def _reduction_row(
    bench: Bench, settings: Settings, name: str, sessions: int,
    explore: Callable[..., Awaitable[Exploration]], walk: Callable[[Any], Awaitable[object]],
) -> None:
    fig = bench.figure(
        f"reduction.{name.replace(' ', '.')}.{sessions}", "partial-order reduction", f"{name}, {sessions} sessions",
        "s", "every interleaving (--no-reduction)",
    )  # fmt: skip
    runs = replays = 0
    for _ in range(settings.runs):
        reduced = await explore(reduction=True)
        fig.samples.append(reduced.seconds)
        runs, replays = reduced.runs, replays + reduced.replays
    each = 1000 * fig.value / max(runs, 1)
    again = f", {replays} replayed after a lock's wake order diverged" if replays else ""
    estimate = await estimate_runs(walk)
    if estimate > settings.full_cap:
        fig.note = f"{runs} interleavings{again}, {each:.1f} ms each; full search not run: about {estimate:,}"
        return
    try:
        full = await explore(reduction=False)
    except ScheduleError as exc:  # the server woke lock waiters in another order: the full search cannot replay
        fig.note = f"{runs} interleavings{again}, {each:.1f} ms each; full search stopped: {exc}"[:200]
        return
    fig.floor_samples.append(full.seconds)
    fig.note = (f"{runs} of {full.runs} interleavings{again}, {each:.1f} ms each against"
                f" {1000 * full.seconds / full.runs:.1f}")


# -- the run --------------------------------------------------------------------------------------


async def bench_database(bench: Bench, dsn: str, settings: Settings, console: Console) -> None:
    """Every figure that needs the server: the sides are opened once and measured round by round."""
    charge = [i for i in SCENARIOS.values() if i.contract == "handle_charge"]
    consumers = [i for i in SCENARIOS.values() if i.contract == "handle_event"]
    sides: list[Side] = []
    for info in [*charge, *consumers]:
        for side in ("buggy", "fixed"):
            sides.append(Side(info, side, await Workspace.open(dsn), info.module(side)))
    by_name = {s.name: s for s in sides}
    with tempfile.TemporaryDirectory(prefix="lab-bench-") as tmp:
        async with opened(sides):
            s1_buggy, s1_fixed = by_name["s1.buggy"], by_name["s1.fixed"]
            cap = settings.explore_cap
            explored = {2: await explored_statements(s1_buggy, 2, cap), 3: await explored_statements(s1_fixed, 3, cap)}
            for round_no in range(1, settings.runs + 1):
                console.print(f"[dim]round {round_no} of {settings.runs}[/]")
                await bench_explore(bench, s1_buggy, 2, explored[2])
                await bench_explore(bench, s1_fixed, 3, explored[3])
                for concurrency in settings.stress_trials:
                    for stressed in (s1_fixed, s1_buggy):
                        await bench_stress(bench, stressed, concurrency, settings)
                await bench_driver(bench, s1_fixed, settings, Path(tmp))
                for info in [*charge, *consumers]:
                    fixed = by_name[f"s{info.number}.fixed"]
                    await bench_price(bench, fixed, by_name.get(f"s{info.number}.buggy"), settings, Path(tmp))


def run(settings: Settings, console: Console) -> Bench:
    bench = Bench()
    if settings.startup:
        console.print("[dim]start-up: make scenario-1, provision() warm and cold, pg_ctl start[/]")
        bench_startup(bench, settings)
    with provision(EMBEDDED) as pg:
        console.print(f"[dim]{pg.description}[/]")
        asyncio.run(bench_database(bench, pg.dsn, settings, console))
        asyncio.run(bench_reduction(bench, pg.dsn, settings, console))
    if not bench_virtual(bench, settings):
        console.print("[dim]virtual time: lab.attacks.herd has no bench_virtual_time; row left out[/]")
    return bench


def table(bench: Bench, settings: Settings) -> Table:
    title = (
        f"make bench: each figure the median of {settings.runs} run{'s' if settings.runs > 1 else ''}"
        f" on {os.cpu_count()} cores; × floor = its cost over the floor's (above 1: slower)"
    )
    out = Table(title=title, title_justify="left")
    out.add_column("figure")
    for column in ("measured", "floor", "× floor"):
        out.add_column(column, justify="right")
    out.add_column("floor is / note")
    section = ""
    for fig in bench.figures.values():
        if fig.section != section:
            if section:
                out.add_section()
            out.add_row(f"[bold]{fig.section}[/]")
            section = fig.section
        ratio = fig.ratio
        floor = fig.floor
        notes = " · ".join(n for n in (fig.floor_label, fig.note) if n)
        out.add_row(
            fig.label, _show(fig.value, fig.unit), _show(floor, fig.unit) if floor is not None else "",
            f"{ratio:.1f}×" if ratio is not None else "", notes,
        )  # fmt: skip
    return out


def _show(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f} s" if value < 1 else f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    return f"{value:,.0f} {unit}"


def results(bench: Bench, settings: Settings) -> dict[str, Any]:
    return {
        "meta": {
            "runs": settings.runs,
            "settings": asdict(settings),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "commit": _commit(),
        },
        "figures": {
            key: {
                "section": f.section, "label": f.label.strip(), "unit": f.unit, "value": f.value,
                "floor": f.floor, "floor_is": f.floor_label, "ratio": f.ratio, "samples": f.samples,
                "floor_samples": f.floor_samples, "note": f.note,
            }
            for key, f in bench.figures.items()
        },
    }


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


@contextlib.contextmanager
def _wide(console: Console) -> Iterator[None]:
    if not console.is_terminal:
        console.width = 160
    yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="one short run of everything (for the test)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3)")
    parser.add_argument("--json", default="bench/results.json", help="where to write the results")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up rows")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.runs:
        settings = Settings(**(asdict(settings) | {"runs": args.runs}))
    if args.no_startup:
        settings = Settings(**(asdict(settings) | {"startup": False}))
    console = Console(highlight=False)
    with _wide(console):
        started = time.perf_counter()
        bench = run(settings, console)
        console.print(table(bench, settings))
        console.print(f"[dim]{time.perf_counter() - started:.0f} s in all; results in {args.json}[/]")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results(bench, settings), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
