"""Provisioning: the lab gets a real server, never the wrong one, and leaves no server behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
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
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from lab.errors import LabError
from lab.postgres import container as lab_container
from lab.postgres import provision as lab_postgres  # (conftest has a fixture named postgres)
from lab.postgres.provision import Postgres, docker_daemon_answers, provision, verify

REPO = Path(__file__).resolve().parent.parent
# GitHub's runners have Docker; pointing DOCKER_HOST at nothing is how a test insists on embedded.
NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
LAB_SCRIPT = """
import signal, sys
from lab.postgres.provision import provision
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


def _attached(segment: list[str]) -> int:
    """How many processes hold the SysV segment (key, shmid); 0 once it is unattached or gone."""
    for row in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
        if row.split()[:2] == segment:
            return int(row.split()[6])
    return 0


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
            assert await conn.fetchval("SHOW dynamic_shared_memory_type") == "mmap"  # in the data dir, not /dev/shm
        finally:
            await conn.close()
        tree = _server_tree(root)
        assert len(tree) > 1 and _mentioning(root)
    assert _until(lambda: not any(map(_alive, tree)) and not _mentioning(root))
    assert not root.exists()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user cache (platformdirs reads XDG_CACHE_HOME at each call), so no template exists yet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "idempotency-lab"


def _no_initdb(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(argv: list[str], **kwargs: object) -> tuple[int, bytes]:
        raise AssertionError(f"initdb ran: {argv}")

    monkeypatch.setattr(lab_postgres, "_run_group", refuse)  # initdb is the only thing run through it


def _answers(pg: Postgres) -> bool:
    """The server takes a connection and answers a query (from a plain test: its own event loop)."""

    async def query() -> bool:
        conn = await asyncpg.connect(pg.dsn)
        try:
            return bool(await conn.fetchval("SELECT count(*) > 0 FROM pg_database WHERE datname = 'postgres'"))
        finally:
            await conn.close()

    return asyncio.run(query())


def test_first_start_keeps_a_template_and_later_starts_copy_it_without_initdb(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first start runs initdb and saves the cluster in the user's cache; the next runs no initdb at all."""
    with provision(NO_DOCKER) as first:
        assert _answers(first)
    version = lab_postgres._version(lab_postgres._find_bindir())
    assert sorted(p.name for p in cache.iterdir()) == [lab_postgres.template_dir(version).name]
    _no_initdb(monkeypatch)
    with provision(NO_DOCKER) as second:
        assert _answers(second)
        data = _root_of(second.dsn) / "data"
        assert data.stat().st_mode & 0o777 == 0o700  # what postgres demands of a data directory
        assert data.stat().st_uid == (pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid())
    assert not (lab_postgres.template_dir(version) / "postmaster.pid").exists()  # the copy ran, not the template


def test_two_labs_starting_together_each_get_a_server_and_leave_one_whole_template(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two labs with no template both run initdb and both save; one template results, and it starts a server."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cache.parent)}
    labs = [
        subprocess.Popen([sys.executable, "-c", LAB_SCRIPT], cwd=REPO, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    try:
        dsns = [lab.stdout.readline() for lab in labs if lab.stdout is not None]
        assert len(dsns) == 2 and all(dsn.startswith("postgresql://") for dsn in dsns), dsns
    finally:
        for lab in labs:
            lab.communicate("", timeout=30)
    assert [lab.returncode for lab in labs] == [0, 0]
    [template] = cache.iterdir()  # no staging dir left over, no second template
    _no_initdb(monkeypatch)
    with provision(NO_DOCKER) as pg:
        assert _answers(pg)
    assert [p.name for p in cache.iterdir()] == [template.name]


def test_a_lab_that_loses_the_race_to_save_leaves_the_winner_untouched(cache: Path, tmp_path: Path) -> None:
    """Saving onto a template that appeared meanwhile keeps the first one, and leaves no staging dir behind."""
    template = lab_postgres.template_dir("0.test")
    winner, loser = tmp_path / "winner", tmp_path / "loser"
    for data, mark in ((winner, "first"), (loser, "second")):
        (data / "global").mkdir(parents=True)
        (data / "global" / "pg_control").write_text(mark)
    lab_postgres._save_template(winner, template)
    lab_postgres._save_template(loser, template)
    assert (template / "global" / "pg_control").read_text() == "first"
    assert [p.name for p in cache.iterdir()] == [template.name]


def test_a_damaged_template_is_replaced_and_a_dead_labs_staging_dir_is_removed(cache: Path) -> None:
    """A template without pg_control is never copied; the next save replaces it and reaps dead labs' staging dirs."""
    version = lab_postgres._version(lab_postgres._find_bindir())
    template = lab_postgres.template_dir(version)
    (template / "base").mkdir(parents=True)  # what a hand-made or half-deleted cache might hold
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = cache / f".staging-{dead.pid}-cafe"  # a lab SIGKILLed while it copied
    stale.mkdir()
    with provision(NO_DOCKER):
        pass
    assert (template / "global" / "pg_control").is_file()
    assert [p.name for p in cache.iterdir()] == [template.name]


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

    def gone() -> bool:  # every process of the server: those seen above, and any forked since (they hold the segment)
        return not any(map(_alive, tree)) and not _mentioning(root) and not _attached(segment)

    assert _until(gone), (_mentioning(root), _attached(segment))
    if sig == signal.SIGINT:
        assert not root.exists()  # KeyboardInterrupt ran the context manager's cleanup
    else:
        lab_postgres.remove_stale_dirs()  # what the next lab does at start-up
        assert not root.exists()
    shm = [row.split()[:2] for row in Path("/proc/sysvipc/shm").read_text().splitlines()]
    assert segment not in shm  # a killed postmaster's interlock segment does not pile up


def test_docker_probe_of_a_missing_socket_answers_false_at_once() -> None:
    """A missing socket file means no daemon, decided without waiting: with a 60 s deadline, an answer within 30
    s (on any load) proves the probe did not wait for it."""
    start = time.monotonic()
    assert not docker_daemon_answers(timeout=60, docker_host="unix:///nonexistent/docker.sock")
    assert time.monotonic() - start < 30


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
    """A unix or TCP socket that accepts but never answers is no daemon, and the probe says so at its 1 s deadline
    (the bound leaves a loaded machine room to schedule it; a probe that waited for an answer would never return)."""
    with (
        _silent_listener(socket.AF_UNIX) as unix_url,
        _silent_listener(socket.AF_INET) as tcp_url,
        ThreadPoolExecutor() as pool,
    ):
        start = time.monotonic()
        answers = list(pool.map(lambda url: docker_daemon_answers(docker_host=url), [unix_url, tcp_url]))
        elapsed = time.monotonic() - start
    assert answers == [False, False]
    assert 0.99 <= elapsed < 10


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


class _Found:
    """What docker-py's containers.list gives: labels, and remove()."""

    def __init__(self, owner: str, removed: list[str]) -> None:
        self.labels, self._removed = {lab_container.OWNER: owner}, removed

    def remove(self, force: bool, v: bool) -> None:
        self._removed.append(self.labels[lab_container.OWNER])


def test_only_containers_of_labs_on_this_machine_whose_process_is_gone_are_removed() -> None:
    """A dead lab's container goes; a live lab's, one whose pid was reused, and another machine's are judged right."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    boot, mine = lab_container._boot_id(), lab_container._owner(os.getpid())
    owners = {
        "alive": mine,
        "dead": f"{boot}/{dead.pid}/{lab_container._start_time(os.getpid())}",
        "pid reused": f"{boot}/{os.getpid()}/1",  # same pid, another start time: not the lab that started it
        "other machine": f"another-boot-id/{dead.pid}/1",
    }
    removed: list[str] = []

    def listing(**kwargs: object) -> list[_Found]:
        assert kwargs == {"all": True, "filters": {"label": lab_container.OWNER}}
        return [_Found(owner, removed) for owner in owners.values()]

    lab_container._remove_orphans(SimpleNamespace(containers=SimpleNamespace(list=listing)))  # docker-py's shape
    assert sorted(removed) == sorted([owners["dead"], owners["pid reused"]])


def test_a_docker_daemon_that_stops_answering_is_one_clear_line() -> None:
    """A daemon that answered the ping but fails the first real request is one LabError line, not a traceback."""
    gone = "unix:///nonexistent/docker.sock"
    one_line = r"^the Docker daemon at unix:///nonexistent/docker\.sock answered a ping, then failed: [^\n]+$"
    with pytest.raises(LabError, match=one_line), lab_container.container(gone, lab_container.IMAGE, {}):
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
        assert 0.99 <= time.monotonic() - start < 10  # at its timeout, with room for a loaded machine
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


INVALID, PORTS = "LAB_DATABASE_URL is not a valid URL", "but a port is a number from 1 to 65535"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://[::1", f"{INVALID} (Invalid IPv6 URL): postgresql://[::1"),
        ("postgresql://lab:secret@[::1/x", f"{INVALID} (Invalid IPv6 URL): postgresql://lab:***@[::1/x"),
        ("postgresql://db.example:99999/shop", f"LAB_DATABASE_URL names db.example:99999, {PORTS}"),
        ("postgresql://db.example:0/shop", f"LAB_DATABASE_URL names db.example:0, {PORTS}"),
        ("postgresql://a:5432,b:http/shop", f"LAB_DATABASE_URL names b:http, {PORTS}"),
    ],
)
def test_malformed_database_url_is_one_line_naming_its_own_address(url: str, message: str) -> None:
    """A URL asyncpg cannot parse, or a port out of range, is a LabError naming the URL's own host and port."""
    with pytest.raises(LabError) as caught, provision({"LAB_DATABASE_URL": url}):
        pass
    assert str(caught.value) == message


def test_every_address_of_a_database_url_is_shown_as_written() -> None:
    """Host lists, IPv6 and socket directories are named as the URL writes them, never as 127.0.0.1:5432."""
    urls = {
        "postgresql://u:p@h1:5433,h2/db": "h1:5433,h2:5432/db",
        "postgresql://[::1]:6000/db": "[::1]:6000/db",
        "postgresql:///db?host=/run/pg&port=6001": "/run/pg:6001/db",
    }
    for url, where in urls.items():
        with provision({"LAB_DATABASE_URL": url}) as pg:
            assert pg.description == f"postgres: LAB_DATABASE_URL at {where}"


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


def test_a_held_run_leaves_signals_to_the_main_thread_and_its_mask_as_it_found_it() -> None:
    """Under run_held, to_thread's workers block SIGINT and SIGTERM (so a held block in the main thread holds), and
    the main thread's mask is restored after."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())

    async def masks() -> tuple[set[int], set[int]]:
        worker = await asyncio.to_thread(signal.pthread_sigmask, signal.SIG_BLOCK, set())
        return worker, signal.pthread_sigmask(signal.SIG_BLOCK, set())

    worker, main = lab_postgres.run_held(masks)
    assert {signal.SIGINT, signal.SIGTERM} <= worker
    assert not {signal.SIGINT, signal.SIGTERM} & main  # the coroutine itself runs with them released
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


def test_a_stale_dir_stays_while_a_process_still_holds_its_servers_segment(tmp_path: Path) -> None:
    """The reaper drops a dead server's segment and lets its dir go only once nothing holds the segment: the dir's
    postmaster.pid is the segment's only record, so a dir removed while a backend still held it leaked it for good."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    shmid = libc.shmget(0, 56, 0o600 | 0o1000)  # IPC_PRIVATE, IPC_CREAT: a segment of our own
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    address = libc.shmat(shmid, None, 0)  # held, as by a backend that has not noticed its postmaster died
    dead = subprocess.Popen(["true"])
    dead.wait()
    data = tmp_path / "data"
    data.mkdir()
    (data / "postmaster.pid").write_text(f"{dead.pid}\n{data}\n0\n5432\n\n\n         0    {shmid}\n")
    segment = ["0", str(shmid)]
    try:
        held = lab_postgres._reap(data)
        still_there = _attached(segment)
    finally:
        libc.shmdt(ctypes.c_void_p(address))
    released = lab_postgres._reap(data)
    listed = [row.split()[1] for row in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
    if str(shmid) in listed:
        libc.shmctl(shmid, 0, None)  # (IPC_RMID) not ours to leave, whatever the assertions say
    assert (held, still_there) == (False, 1)
    assert released and str(shmid) not in listed


COPY_CUT_SHORT = """
import os, signal, sys, tempfile
from lab.postgres import provision
signal.signal(signal.SIGINT, signal.default_int_handler)
module, name, when = {"mkdtemp": (tempfile, "mkdtemp", "after"), "rename": (os, "rename", "before")}[sys.argv[1]]
original = getattr(module, name)
def signalled(*args, **kwargs):
    setattr(module, name, original)
    if when == "before":
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)
    result = original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)
    return result
setattr(module, name, signalled)
bindir = provision._find_bindir()
try:
    provision._world_readable_copy(bindir, provision._version(bindir))
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize("where", ["mkdtemp", "rename"])
def test_a_ctrl_c_during_the_binaries_copy_leaves_nothing_a_later_lab_cannot_reap(tmp_path: Path, where: str) -> None:
    """Ctrl-C just as the shared copy's dir is made, or as it becomes the cache: what is left is the whole cache,
    or a dir whose pid file lets the next lab reap it, never a dir nothing will remove."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", COPY_CUT_SHORT, where], env=env, capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.stdout.strip() == "interrupted", done.stderr
    cache = tmp / f"{lab_postgres.PREFIX}pg-{lab_postgres._version(lab_postgres._find_bindir())}"
    assert [p.name for p in tmp.iterdir() if p != cache and not (p / "lab.pid").exists()] == []
    assert not (cache / "lab.pid").exists()  # a cache with one would be reaped as a dead lab's dir


STARTED_THEN_CUT = """
import json, os, signal, subprocess, sys, time
from pathlib import Path
from lab.postgres import provision
signal.signal(signal.SIGINT, signal.default_int_handler)
original, server = subprocess._fork_exec, {}
def forked(args, *rest, **kwargs):
    pid = original(args, *rest, **kwargs)
    argv = [os.fsencode(arg) for arg in args]
    if argv[0].endswith(b"/postgres") and b"-D" in argv:  # the server itself, not initdb nor --version
        pidfile = Path(os.fsdecode(argv[argv.index(b"-D") + 1])) / "postmaster.pid"
        deadline = time.monotonic() + 30
        while "ready" not in (pidfile.read_text() if pidfile.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.005)  # (a server still starting may give up once its dir goes; a ready one runs on)
        server.update(pid=pid, root=str(pidfile.parent.parent))
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C after the fork, before Popen returns the server's handle
    return pid
subprocess._fork_exec = forked
try:
    with provision.provision({"DOCKER_HOST": "unix:///nonexistent/docker.sock"}):
        pass
except KeyboardInterrupt:
    pass
try:
    os.kill(server["pid"], 0)
    server["running"] = os.waitpid(server["pid"], os.WNOHANG) == (0, 0)
except ChildProcessError:
    server["running"] = True  # (not a zombie of ours: someone else's process under that pid)
except ProcessLookupError:
    server["running"] = False
server["left"] = os.path.exists(server["root"])
print(json.dumps(server))
"""


def test_a_ctrl_c_as_the_server_starts_stops_it_and_removes_its_dir() -> None:
    """A Ctrl-C between the server's fork and the lab holding its handle: the server is stopped, its dir removed.

    Landing there, the signal left a server the lab had no handle to stop, writing into the dir the lab was
    removing: a dir holding only data/, which no later lab could reap (test_cli's signalled tries, once in CI).
    """
    with tempfile.TemporaryDirectory(prefix="lab-cut-") as tmp:  # not tmp_path: as root, the server runs as
        os.chmod(tmp, 0o755)  # nobody, and must reach its dir, which pytest's 0700 parents forbid
        env = {**os.environ, "TMPDIR": tmp, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", STARTED_THEN_CUT], env=env, capture_output=True, text=True,
                              check=False, timeout=120)
        assert done.returncode == 0, done.stderr
        server = json.loads(done.stdout)
        assert (server["running"], server["left"]) == (False, False)
        assert [p.name for p in Path(tmp).iterdir() if not p.name.startswith(f"{lab_postgres.PREFIX}pg-")] == []


def test_a_dir_that_cannot_all_go_keeps_its_pid_file_and_goes_whole_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a removal leaves (a process still writing in data/) keeps lab.pid, the record remove_stale_dirs reads
    to reap it once its owner is gone: a dir of data/ alone was litter no lab would ever reap."""
    root = lab_postgres.owned_temp_dir("", tmp_path)
    for name in ("data/base", "sock"):
        (root / name).mkdir(parents=True)
    (root / "postgres.log").write_text("")
    stuck = root / "data"
    removing = shutil.rmtree

    def cannot_remove_data(path: Path, ignore_errors: bool = False) -> None:
        if Path(path) != stuck:
            removing(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", cannot_remove_data)
    lab_postgres.remove_owned_dir(root)
    assert sorted(p.name for p in root.iterdir()) == ["data", "lab.pid"]
    monkeypatch.setattr(shutil, "rmtree", removing)
    lab_postgres.remove_owned_dir(root)
    assert not root.exists()
