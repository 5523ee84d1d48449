"""The `lab` command as a user meets it: exit codes, one-line errors, and nothing left behind."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from lab.postgres import Postgres

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


def _column(dsn: str, sql: str) -> list[Any]:
    """The first column of a query on the test server, from sync test code (each call its own loop)."""

    async def read() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return [row[0] for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(read())


def _lab_schemas(dsn: str) -> list[str]:
    return _column(dsn, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'lab\\_%' ORDER BY 1")


def _state(dsn: str) -> tuple[list[int], list[str]]:
    """The user's own rows, and the lab's schemas."""
    return _column(dsn, "SELECT id FROM public.users_own_table ORDER BY id"), _lab_schemas(dsn)


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
    rows, schemas = _state(postgres.dsn)
    assert rows == [1, 2, 3]
    assert schemas == before[1]


def test_ctrl_c_mid_run_drops_the_schema_and_exits_130(postgres: Postgres, canary: str) -> None:
    """Ctrl-C in the middle of a stress run cleans up its schemas, leaves the user's table, exits 130."""
    _, before = _state(postgres.dsn)
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn}
    proc = subprocess.Popen([*LAB, "run", "1", "--stress", "--trials", "100000"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while len(_state(postgres.dsn)[1]) <= len(before):  # poll: the run has created its schemas
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
    assert after == before


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
        data_dir = Path(os.readlink(f"/proc/{servers[0]}/cwd"))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert not Path(f"/proc/{servers[0]}").exists()
    assert not data_dir.exists()


def test_run_2_shows_the_herd_and_brookers_table(postgres: Postgres) -> None:
    """`lab run 2` exits 0: the buggy loop's hazards reproduced, the fix held, the backoff table printed."""
    done = lab("run", "2", env={"LAB_DATABASE_URL": postgres.dsn})
    assert done.returncode == 0, done.stderr
    assert "buggy: hazards reproduced" in done.stdout and "fixed: holds" in done.stdout
    assert "full jitter" in done.stdout and "decorrelated" in done.stdout


def test_too_many_sessions_for_the_server_is_one_line_and_exit_2(postgres: Postgres) -> None:
    """Stress beyond the server's max_connections says so in one line and exits 2, leaving no schema behind."""
    before = _lab_schemas(postgres.dsn)
    done = lab("run", "1", "--fixed", "--stress", "--trials", "1", "--concurrency", "500",
               env={"LAB_DATABASE_URL": postgres.dsn})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "max_connections" in done.stderr and "Traceback" not in done.stderr
    assert _lab_schemas(postgres.dsn) == before
