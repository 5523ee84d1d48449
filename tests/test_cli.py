"""The `lab` command as a user meets it: exit codes, one-line errors, and nothing left behind."""

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import soak
from sizing import USED

from lab.postgres.provision import Postgres
from lab.postgres.workspace import Creator

LAB = [sys.executable, "-m", "lab.cli"]
NO_DOCKER = "unix:///nonexistent/docker.sock"  # force the embedded default, even where Docker exists


def lab(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    merged = {**os.environ, "DOCKER_HOST": NO_DOCKER, **(env or {})}
    if env is None or "LAB_DATABASE_URL" not in env:
        merged.pop("LAB_DATABASE_URL", None)
    return subprocess.run([*LAB, *args], capture_output=True, text=True, env=merged, timeout=timeout, check=False)


def test_list_names_every_registered_scenario() -> None:
    """`lab list` exits 0 and shows scenario 1 with its make target."""
    done = lab("list")
    assert done.returncode == 0
    assert "s1_dedup_race" in done.stdout and "make scenario-1" in done.stdout


def test_unknown_scenario_is_one_line_and_exit_2() -> None:
    """An unknown scenario gets one clear line naming the known ones, and exit code 2."""
    done = lab("run", "9")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "unknown scenario '9'" in done.stderr and "1 (s1_dedup_race)" in done.stderr


def test_bad_flag_is_one_line_and_exit_2() -> None:
    """A flag lab does not know gets one line, not a usage wall, and exit code 2."""
    done = lab("run", "1", "--turbo")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "--turbo" in done.stderr


def test_unreachable_database_url_fails_fast_naming_the_host() -> None:
    """A LAB_DATABASE_URL nobody answers fails within 5 s with one line naming host and port."""
    started = time.monotonic()
    done = lab("run", "1", env={"LAB_DATABASE_URL": "postgresql://lab@127.0.0.1:1/nowhere"})
    assert time.monotonic() - started < 10  # interpreter start-up included; the connect itself is bounded at 5 s
    assert done.returncode == 2
    assert "127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("url", "named"),
    [("postgresql://[::1", "postgresql://[::1"), ("postgresql://lab@db.example:99999/x", "db.example:99999")],
)
def test_malformed_database_url_is_one_line_and_exit_2(url: str, named: str) -> None:
    """A malformed LAB_DATABASE_URL, or one with a port out of range, is one line naming it, and exit 2."""
    done = lab("run", "1", env={"LAB_DATABASE_URL": url})
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr, done.stderr
    assert "127.0.0.1" not in done.stderr


def _column(dsn: str, sql: str) -> list[Any]:
    """The first column of a query on the test server, from sync test code (each call its own loop)."""

    async def read() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return [row[0] for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(read())


def _creators(dsn: str) -> dict[str, Creator | None]:
    """Every lab schema on the server, and the creator it records (None: no record the lab wrote)."""
    notes = _column(
        dsn,
        "SELECT nspname || ' ' || coalesce(obj_description(oid, 'pg_namespace'), '') FROM pg_namespace"
        " WHERE nspname LIKE 'lab\\_%' ORDER BY 1",
    )
    return {name: Creator.of(note) for name, _, note in (line.partition(" ") for line in notes)}


def _schemas_made_by(dsn: str, pid: int) -> list[str]:
    """The lab schemas whose creator record names process ``pid``."""
    return [name for name, creator in _creators(dsn).items() if creator is not None and creator.pid == pid]


def _orphans(dsn: str) -> set[str]:
    """Lab schemas nobody alive will drop. Other labs may share the server, so a live one's do not count."""
    return {name for name, creator in _creators(dsn).items() if creator is None or creator.gone()}


def _state(dsn: str) -> tuple[list[int], set[str]]:
    """The user's own rows, and the lab's orphaned schemas."""
    return _column(dsn, "SELECT id FROM public.users_own_table ORDER BY id"), _orphans(dsn)


@pytest.fixture
def canary(postgres: Postgres) -> Iterator[str]:
    """A user's own table in public, which a lab run must leave exactly as it was."""
    _column(postgres.dsn, "DROP TABLE IF EXISTS public.users_own_table")
    _column(postgres.dsn, "CREATE TABLE public.users_own_table (id int)")
    _column(postgres.dsn, "INSERT INTO public.users_own_table VALUES (1), (2), (3)")
    yield "public.users_own_table"
    _column(postgres.dsn, "DROP TABLE IF EXISTS public.users_own_table")


def test_run_against_a_users_server_touches_only_its_own_schema(postgres: Postgres, canary: str) -> None:
    """With LAB_DATABASE_URL, a whole run leaves the user's table intact and drops every schema it made."""
    before = _state(postgres.dsn)
    done = lab("run", "1", "--fixed", "--stress", "--trials", "3", env={"LAB_DATABASE_URL": postgres.dsn})
    assert done.returncode == 0, done.stderr
    assert "postgres: LAB_DATABASE_URL" in done.stdout
    rows, orphans = _state(postgres.dsn)
    assert rows == [1, 2, 3]
    assert orphans <= before[1]  # (the run may have reaped some a killed lab had left)


def test_ctrl_c_mid_run_drops_the_schema_and_exits_130(postgres: Postgres, canary: str) -> None:
    """Ctrl-C in the middle of a stress run cleans up its schemas, leaves the user's table, exits 130."""
    _, before = _state(postgres.dsn)
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn}
    proc = subprocess.Popen([*LAB, "run", "1", "--stress", "--trials", "100000"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not _schemas_made_by(postgres.dsn, proc.pid):  # poll: the run has created its schemas
            assert time.monotonic() < deadline, "the run never created its schema"
            assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    rows, after = _state(postgres.dsn)
    assert rows == [1, 2, 3]
    assert after <= before and _schemas_made_by(postgres.dsn, proc.pid) == []


@pytest.mark.parametrize(
    "command",
    [["run", "1", "--stress", "--trials", "100000"], ["herd", "--occ", "--clients", "50,50,50,50,50,50"]],
    ids=["run", "herd-occ"],
)
def test_schemas_of_a_killed_lab_are_dropped_by_the_next_one(postgres: Postgres, command: list[str]) -> None:
    """SIGKILL leaves a run's schemas behind; the next lab on that database drops them and says so in one line."""
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn}
    proc = subprocess.Popen([*LAB, *command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (left := _schemas_made_by(postgres.dsn, proc.pid)):
            assert time.monotonic() < deadline, "the run never created its schema"
            assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert _schemas_made_by(postgres.dsn, proc.pid) == left  # nothing ran to drop them
    done = lab("run", "1", "--fixed", "--stress", "--trials", "1", env={"LAB_DATABASE_URL": postgres.dsn})
    assert done.returncode == 0, done.stderr
    assert _schemas_made_by(postgres.dsn, proc.pid) == []
    said = [line for line in done.stderr.splitlines() if line.startswith("lab: removed ")]
    assert len(said) == 1 and all(name in said[0] for name in left) and f"pid {proc.pid} on " in said[0], done.stderr


@pytest.fixture
def role_without_create(postgres: Postgres) -> Iterator[str]:
    """A URL for a login role that may connect but not create schemas (dropped afterwards, on any server)."""
    role, password = f"lab_test_{secrets.token_hex(4)}", secrets.token_hex(8)
    _column(postgres.dsn, f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        # A new role has CONNECT and TEMP on a database, not CREATE, unless PUBLIC was granted it; a REVOKE
        # here would write the database's ACL, and the user's server must be left exactly as it was.
        can = _column(postgres.dsn, f"SELECT has_database_privilege('{role}', current_database(), 'CREATE')")
        assert can == [False], "this server grants CREATE on the database to PUBLIC"
        parts = urlsplit(postgres.dsn)
        yield urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.netloc.rpartition('@')[2]}"))
    finally:
        _column(postgres.dsn, f"DROP ROLE {role}")


def test_a_role_that_may_not_create_schemas_is_one_line_and_exit_2(role_without_create: str) -> None:
    """A role without CREATE on the database is told which privilege it lacks, in one line, with exit 2."""
    done = lab("run", "1", "--buggy", env={"LAB_DATABASE_URL": role_without_create})
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "lacks the CREATE privilege on database" in done.stderr and "GRANT CREATE ON DATABASE" in done.stderr


def _postgres_children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            argv = cmdline.split(b"\0")
            if stat.rsplit(")", 1)[1].split()[1] == str(pid) and argv[0].endswith(b"/postgres"):
                found.append(int(entry.name))
    return found


def _data_dir(postmaster: int) -> Path:
    """The server's data directory, from the ``-D`` its command line was exec'd with.

    Not its working directory: postgres changes into the data directory only once it has started
    running, so /proc/<pid>/cwd read in between names the directory the lab started it in.
    """
    argv = Path(f"/proc/{postmaster}/cmdline").read_bytes().split(b"\0")
    return Path(os.fsdecode(argv[argv.index(b"-D") + 1]))


def test_sigterm_stops_the_embedded_server_and_exits() -> None:
    """SIGTERM to a run on the embedded server stops that server and removes its directory."""
    env = {k: v for k, v in os.environ.items() if k != "LAB_DATABASE_URL"}
    env["DOCKER_HOST"] = NO_DOCKER
    proc = subprocess.Popen([*LAB, "run", "1", "--stress", "--trials", "100000"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (servers := _postgres_children(proc.pid)):
            assert time.monotonic() < deadline, "the embedded server never started"
            assert proc.poll() is None, proc.communicate()
        data_dir = _data_dir(servers[0])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert not Path(f"/proc/{servers[0]}").exists()
    assert data_dir.name == "data" and not data_dir.parent.exists()  # the server's whole temp dir is gone


def test_sigterm_ends_a_run_whose_parent_ignored_sigint(postgres: Postgres) -> None:
    """A lab started with SIGINT ignored (nohup, a script's `cmd &`) still ends on SIGTERM: exit 130, one line."""
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn}
    proc = subprocess.Popen([*LAB, "run", "1", "--stress", "--trials", "100000"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "postgres: LAB_DATABASE_URL at ...": the run has begun
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.splitlines() == ["lab: interrupted; everything the lab started is stopped"]


ONE_RUN = ["run", "1", "--fixed", "--stress", "--trials", "1"]
LOOP_BEING_BUILT = "asyncio.selector_events:BaseSelectorEventLoop._make_self_pipe"  # before it has its _ssock


def _signalled_at(where: str, command: list[str], env: dict[str, str]) -> tuple[int | None, str, int]:
    """``lab command`` sent SIGTERM at ``where`` (tests/signal_at.py): its exit code, its stderr, its pid."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "signal_at.py"), where, *command], env=env,
                            text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err, proc.pid


@pytest.mark.parametrize(
    ("command", "where"),
    [
        (ONE_RUN, LOOP_BEING_BUILT),
        (ONE_RUN, "asyncio.base_events:BaseEventLoop.create_task"),
        (ONE_RUN, "asyncio.base_events:BaseEventLoop.close"),
        (["check", "1", "fixes/s1_dedup_race.py"], LOOP_BEING_BUILT),
    ],
    ids=["run-loop-being-built", "run-coroutine-not-yet-awaited", "run-loop-closing", "check-loop-being-built"],
)
def test_sigterm_while_asyncio_run_builds_or_closes_its_loop_is_one_line_and_exit_130(
    postgres: Postgres, command: list[str], where: str
) -> None:
    """SIGTERM at asyncio.run's edges (loop half built, coroutine not yet awaited, loop closing): exit 130, one line.

    CI saw the random-moment test land there: "no attribute '_ssock'" and "coroutine ... was never awaited"
    printed around the line. tests/signal_at.py sends it at exactly that point, every time.
    """
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn}
    code, err, _ = _signalled_at(where, command, env)
    assert code == 130, err
    assert err.splitlines() == [soak.INTERRUPTED]


def test_sigterm_as_soon_as_the_lab_handles_it_is_one_line_and_exit_130() -> None:
    """SIGTERM the moment its handler is in place (``lab list``, which has the shortest run): exit 130, one line.

    A signal sender that waits for the handler, as make soak does, may send it then; it landed before the
    lab's ``try`` and escaped as a KeyboardInterrupt traceback, killed by SIGINT (make soak, once in 300).
    """
    code, err, _ = _signalled_at("signal:signal:after@2", ["list"], {**os.environ, "DOCKER_HOST": NO_DOCKER})
    assert code == 130, err
    assert err.splitlines() == [soak.INTERRUPTED]


# A command that defines a class, as an import in the middle of a command does, and SIGTERM landing in
# its __set_name__: Python 3.11 reports the KeyboardInterrupt raised there as a RuntimeError.
SIGNALLED_IN_SET_NAME = """
import os, signal, sys
from lab import cli

class Sends:
    def __set_name__(self, owner, name):
        os.kill(os.getpid(), signal.SIGTERM)

def command(argv):
    class Imported:
        field = Sends()
    return 0

cli._command = command
sys.exit(cli.main([]))
"""


def test_sigterm_inside_a_class_definition_is_one_line_and_exit_130() -> None:
    """SIGTERM while a module being imported defines a class (make soak, `check 2`, as hypothesis was imported):
    Python 3.11 wraps the KeyboardInterrupt raised in a __set_name__ in a RuntimeError, which escaped as a
    traceback and exit 1. An interrupt is an interrupt whatever it is wrapped in: exit 130, one line."""
    done = subprocess.run([sys.executable, "-c", SIGNALLED_IN_SET_NAME], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(soak.ROOT)}, check=False)
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == [soak.INTERRUPTED]


def test_sigterm_while_the_workspace_is_dropped_leaves_no_schema(postgres: Postgres) -> None:
    """SIGTERM just as a run drops its schemas on a user's server (Workspace.close): the drop finishes, then
    exit 130 and one line (make soak once found both schemas left after `run 4 --explore`)."""
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn}
    code, err, pid = _signalled_at("lab.postgres.workspace:Workspace.close", ONE_RUN, env)
    assert code == 130, err
    assert err.splitlines() == [soak.INTERRUPTED]
    assert _schemas_made_by(postgres.dsn, pid) == []


def test_sigterm_while_the_occ_table_gives_its_sessions_back_ends_the_run(postgres: Postgres) -> None:
    """SIGTERM just as a trial of Brooker's table starts giving its 10 sessions back (asyncpg's Pool.release, 2nd call:
    the 1st is the trial's reset): the rest stay held, and a pool.close() waiting for them hung for ever (make soak
    saw `herd --occ` and `run 2` still running 20 s after SIGTERM). Exit 130, one line, no schema left."""
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn}
    code, err, pid = _signalled_at("asyncpg.pool:Pool.release:after@2", ["herd", "--occ", "--clients", "10"], env)
    assert code == 130, err
    assert err.splitlines() == [soak.INTERRUPTED]
    assert _schemas_made_by(postgres.dsn, pid) == []


@pytest.mark.parametrize("command", [ONE_RUN, ["check", "1", "fixes/s1_dedup_race.py"]], ids=["run", "check"])
def test_sigterm_while_python_probes_tmpdir_leaves_nothing_there(tmp_path: Path, command: list[str]) -> None:
    """SIGTERM just as Python's first gettempdir has made its probe file (before the try that removes it):
    exit 130, one line, and TMPDIR as empty as it was (the signalled tries below once found the probe there)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o755)
    env = {k: v for k, v in os.environ.items() if k != "LAB_DATABASE_URL"}
    env |= {"TMPDIR": str(tmp), "DOCKER_HOST": NO_DOCKER}
    code, err, _ = _signalled_at("os:open:after", command, env)
    assert code == 130, err
    assert err.splitlines() == [soak.INTERRUPTED]
    assert sorted(p.name for p in tmp.iterdir()) == []


SIGNALS = [(signal.SIGINT, ()), (signal.SIGTERM, (signal.SIGINT,))]  # Ctrl-C; `kill` of a job started with `&`


@pytest.fixture(scope="module")
def signalled() -> Iterator[dict[str, list[soak.Try]]]:
    """One try per command and signal, four at a time (make soak makes 50, at random moments)."""
    root = Path(tempfile.mkdtemp(prefix="lab-soak-"))
    root.chmod(0o755)  # as root, the embedded server runs as nobody, and must reach its dir
    site = soak.Site(root, None)
    try:
        with ThreadPoolExecutor(4) as pool:
            tries = {
                command: [pool.submit(soak.first_landed, site, command, sig, ignored) for sig, ignored in SIGNALS]
                for command in soak.COMMANDS
            }
            yield {command: [future.result() for future in futures] for command, futures in tries.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("command", soak.COMMANDS)
def test_every_command_ends_on_sigint_and_on_sigterm(signalled: dict[str, list[soak.Try]], command: str) -> None:
    """Ctrl-C, and SIGTERM from a parent that ignored SIGINT: exit 130, one line, nothing left behind."""
    tries = signalled[command]
    assert [(t.sig.name, t.landed, t.problems) for t in tries] == [(s.name, True, []) for s, _ in SIGNALS]


def test_a_lost_interrupt_is_delivered_again_once_the_hook_has_returned() -> None:
    """A KeyboardInterrupt Python could not raise (in a weakref callback) comes back, outside the unraisable hook.

    Raised inside the hook it is "Exception ignored in sys.unraisablehook" and lost for good: make soak
    saw a `lab check` run on for 18 s and exit 0 after SIGTERM.
    """
    from lab import cli

    previous = signal.signal(signal.SIGALRM, cli._interrupt)
    # The lab's own SIGINT handler, as _take_signals puts it back: pytest run from a script's `make test &`
    # inherits SIGINT ignored, and the interrupt delivered again was then ignored too.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cli._redeliver_lost_interrupts(SimpleNamespace(exc_value=KeyboardInterrupt()))  # must not raise here
        with pytest.raises(KeyboardInterrupt):
            time.sleep(5)  # but here, 10 ms later
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGINT, previous_int)


def test_run_2_shows_the_herd_and_brookers_table(postgres: Postgres) -> None:
    """`lab run 2` exits 0: the buggy loop's hazards reproduced, the fix held, the backoff table printed."""
    done = lab("run", "2", env={"LAB_DATABASE_URL": postgres.dsn})
    assert done.returncode == 0, done.stderr
    assert "buggy: hazards reproduced" in done.stdout and "fixed: holds" in done.stdout
    assert "full jitter" in done.stdout and "decorrelated" in done.stdout


def test_too_many_sessions_for_the_server_is_one_line_and_exit_2(
    postgres: Postgres, request: pytest.FixtureRequest
) -> None:
    """Stress beyond the server's max_connections (whatever it is) says so in one line and exits 2, leaving
    no schema behind."""
    before = _orphans(postgres.dsn)
    limit = int(_column(postgres.dsn, "SHOW max_connections")[0])
    USED.append(f"{request.node.nodeid}: {limit + 1} sessions, one more than max_connections")
    done = lab("run", "1", "--fixed", "--stress", "--trials", "1", "--concurrency", str(limit + 1),
               env={"LAB_DATABASE_URL": postgres.dsn})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "max_connections" in done.stderr and "Traceback" not in done.stderr
    assert _orphans(postgres.dsn) <= before
