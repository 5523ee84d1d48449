"""Provisioning: the lab gets a real server, never the wrong one, and leaves no server behind."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from lab import postgres as lab_postgres  # (conftest has a fixture named postgres)
from lab.errors import LabError
from lab.postgres import Postgres, docker_daemon_answers, provision, verify

REPO = Path(__file__).resolve().parent.parent
# GitHub's runners have Docker; pointing DOCKER_HOST at nothing is how a test insists on embedded.
NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
LAB_SCRIPT = """
import signal, sys
from lab.postgres import provision
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell may have ignored it
with provision({"DOCKER_HOST": "unix:///nonexistent/docker.sock"}) as pg:
    print(pg.dsn, flush=True)
    sys.stdin.read()
"""


def _until(condition: Callable[[], bool], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) from /proc, or None when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"  # a zombie has exited; only reaping is left


def _server_tree(root: Path) -> set[int]:
    """The postmaster of the server in `root` and every backend it forked."""
    postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return {postmaster} | {pid for pid in pids if (st := _stat(pid)) and st[1] == postmaster}


def _mentioning(root: Path) -> set[int]:
    """Live processes whose command line names the server's temp dir (the postmaster's does)."""
    found = set()
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and str(root).encode() in (p / "cmdline").read_bytes():
                found.add(int(p.name))
        except OSError:
            continue
    return {pid for pid in found if _alive(pid)}


def _root_of(dsn: str) -> Path:
    return Path(parse_qs(urlsplit(dsn).query)["host"][0]).parent


async def test_embedded_server_answers_on_a_private_socket_and_leaves_nothing_behind() -> None:
    """The embedded server answers on a socket in its own temp dir; on exit nothing of it remains."""
    with provision(NO_DOCKER) as pg:
        root = _root_of(pg.dsn)
        assert pg.kind == "embedded"
        assert root.name.startswith("idempotency-lab-") and "127.0.0.1" not in pg.dsn
        assert pg.description.startswith(
            f"postgres: embedded 18.6, unix socket in {root} (no LAB_DATABASE_URL"
        )
        assert (await verify(pg)).startswith("18.")
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert await conn.fetchval("SELECT 6 * 7") == 42
            assert await conn.fetchval("SHOW listen_addresses") == ""  # no TCP at all
        finally:
            await conn.close()
        tree = _server_tree(root)
        assert len(tree) > 1 and _mentioning(root)
    assert _until(lambda: not any(map(_alive, tree)) and not _mentioning(root))
    assert not root.exists()


@pytest.fixture
def lab_process() -> Iterator[subprocess.Popen[str]]:
    lab = subprocess.Popen(
        [sys.executable, "-c", LAB_SCRIPT],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    yield lab
    if lab.poll() is None:
        lab.kill()
    lab.wait()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_server_does_not_outlive_a_lab_that_is_killed(
    lab_process: subprocess.Popen[str], sig: signal.Signals
) -> None:
    """Whether the lab is SIGKILLed, terminated or interrupted, its server's processes are gone soon after."""
    assert lab_process.stdout is not None
    root = _root_of(lab_process.stdout.readline())
    tree = _server_tree(root)
    segment = (root / "data" / "postmaster.pid").read_text().splitlines()[6].split()  # SysV key, id
    assert all(map(_alive, tree))
    os.kill(lab_process.pid, sig)
    lab_process.wait(5)
    assert _until(lambda: not any(map(_alive, tree)) and not _mentioning(root)), _mentioning(root)
    if sig == signal.SIGINT:
        assert not root.exists()  # KeyboardInterrupt ran the context manager's cleanup
    else:
        lab_postgres._remove_stale_dirs()  # what the next lab does at start-up
        assert not root.exists()
    shm = [row.split()[:2] for row in Path("/proc/sysvipc/shm").read_text().splitlines()]
    assert segment not in shm  # a killed postmaster's interlock segment does not pile up


def test_docker_probe_of_a_missing_socket_answers_false_at_once() -> None:
    """A missing socket file means no daemon, decided without waiting."""
    start = time.monotonic()
    assert not docker_daemon_answers(docker_host="unix:///nonexistent/docker.sock")
    assert time.monotonic() - start < 0.1


@contextlib.contextmanager
def _silent_listener(family: socket.AddressFamily) -> Iterator[str]:
    """A socket whose backlog accepts connections that nobody ever reads or answers."""
    with tempfile.TemporaryDirectory(prefix="lab-test-") as tmp, socket.socket(family) as sock:
        sock.bind(f"{tmp}/docker.sock" if family == socket.AF_UNIX else ("127.0.0.1", 0))
        sock.listen(8)
        yield (
            f"unix://{tmp}/docker.sock"
            if family == socket.AF_UNIX
            else f"tcp://127.0.0.1:{sock.getsockname()[1]}"
        )


def test_docker_probe_of_a_silent_daemon_gives_up_within_its_deadline() -> None:
    """A unix or TCP socket that accepts but never answers is no daemon, and the probe says so within ~1 s."""
    with (
        _silent_listener(socket.AF_UNIX) as unix_url,
        _silent_listener(socket.AF_INET) as tcp_url,
        ThreadPoolExecutor() as pool,
    ):
        start = time.monotonic()
        answers = list(pool.map(lambda url: docker_daemon_answers(docker_host=url), [unix_url, tcp_url]))
        elapsed = time.monotonic() - start
    assert answers == [False, False]
    assert elapsed < 1.5


def test_docker_probe_believes_a_daemon_that_answers_ok() -> None:
    """A socket that answers GET /_ping with HTTP 200 "OK", as dockerd does, counts as a daemon."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            assert conn.recv(1024).startswith(b"GET /_ping HTTP/1.0")
            conn.sendall(b"HTTP/1.0 200 OK\r\nApi-Version: 1.47\r\nContent-Length: 2\r\n\r\nOK")

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        assert docker_daemon_answers(docker_host=f"tcp://127.0.0.1:{server.getsockname()[1]}")
    finally:
        thread.join(2)
        server.close()


async def test_docker_is_used_exactly_when_its_daemon_answers() -> None:
    """Without LAB_DATABASE_URL the lab uses testcontainers if and only if a Docker daemon answers."""
    env = {k: v for k, v in os.environ.items() if k != "LAB_DATABASE_URL"}
    answers = docker_daemon_answers(docker_host=env.get("DOCKER_HOST"))
    assert answers or os.environ.get("LAB_EXPECT_DOCKER") != "1", "this CI job has a Docker daemon"
    with provision(env) as pg:
        assert pg.kind == ("docker" if answers else "embedded")
        assert await verify(pg, timeout=30)


def test_docker_that_fails_to_start_a_container_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """When testcontainers cannot start the container, the user gets one LabError line, not a traceback."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")  # testcontainers reads os.environ
    one_line = r"^testcontainers could not start postgres:17\.6-alpine: [^\n]+$"
    with pytest.raises(LabError, match=one_line), lab_postgres._container("unix:///nonexistent/docker.sock"):
        pass


async def test_verify_names_a_refused_server_on_one_line() -> None:
    """A server that refuses the connection is reported with its host and port, on one line, at once."""
    pg = Postgres("postgresql://lab@127.0.0.1:1/x", "env", "")
    start = time.monotonic()
    with pytest.raises(LabError) as caught:
        await verify(pg)
    assert time.monotonic() - start < 5.5
    assert str(caught.value) == "cannot reach postgres at 127.0.0.1:1 (LAB_DATABASE_URL): connection refused"


async def test_verify_gives_up_on_a_server_that_never_answers() -> None:
    """A server that accepts TCP but never answers the startup packet fails verify within its timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(LabError) as caught:
            await verify(Postgres(f"postgresql://lab@127.0.0.1:{port}/x", "env", ""), timeout=1.0)
        assert time.monotonic() - start < 1.5
    message = f"cannot reach postgres at 127.0.0.1:{port} (LAB_DATABASE_URL): timed out after 1 s"
    assert str(caught.value) == message


def test_database_url_is_used_as_given_and_nothing_is_started() -> None:
    """LAB_DATABASE_URL wins in any usual spelling, starts no process and keeps its password out of sight."""
    url = "postgres+asyncpg://lab:secret@db.example:6543/shop"
    before = {p.name for p in Path("/proc").iterdir()}
    with provision({"LAB_DATABASE_URL": url, **NO_DOCKER}) as pg:
        started = {p.name for p in Path("/proc").iterdir()} - before
    assert pg == Postgres(
        "postgresql://lab:secret@db.example:6543/shop",
        "env",
        "postgres: LAB_DATABASE_URL at db.example:6543/shop",
    )
    assert not [pid for pid in started if pid.isdigit() and (st := _stat(int(pid))) and st[1] == os.getpid()]


def test_database_url_of_another_database_is_refused() -> None:
    """A URL for some other database is a clear error, not a confusing driver failure later."""
    with (
        pytest.raises(LabError, match="must start with postgresql://"),
        provision({"LAB_DATABASE_URL": "mysql://x@h/db"}),
    ):
        pass


def test_binaries_out_of_reach_are_copied_where_anyone_can_run_them() -> None:
    """Binaries behind a mode-700 parent are out of nobody's reach; the shared copy runs initdb as nobody."""
    hidden = Path(tempfile.mkdtemp(prefix="lab-test-"))  # mkdtemp makes it 0700, like /root
    (hidden / "bin").mkdir()
    try:
        assert not lab_postgres._reachable_by_others(hidden / "bin")
    finally:
        (hidden / "bin").rmdir()
        hidden.rmdir()
    bindir = lab_postgres._find_bindir()
    version = lab_postgres._version(bindir)
    copy = lab_postgres._world_readable_copy(bindir, version)
    assert lab_postgres._binaries_reachable(copy)
    nobody = pwd.getpwnam("nobody") if os.geteuid() == 0 else None  # the user root runs postgres as
    done = subprocess.run(
        [str(copy / "initdb"), "--version"],
        capture_output=True,
        text=True,
        user=nobody and nobody.pw_uid,
        group=nobody and nobody.pw_gid,
    )
    assert done.stdout.strip() == f"initdb (PostgreSQL) {version}", done.stderr
