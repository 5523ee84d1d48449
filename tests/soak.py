"""``make soak``: SIGINT and SIGTERM end every ``lab`` command within 5 s, exit 130, one line, nothing left.

A try starts a command, waits until the lab has taken over its signals (``SigCgt`` in /proc), lets it
work for a random moment, and sends the signal as a user would: SIGINT to its process group (a
terminal's Ctrl-C), SIGTERM to the process (``kill``). Tries take turns over what the parent ignored
(nothing, SIGINT, SIGTERM, both: ``nohup``, a script's ``cmd &``) and where PostgreSQL comes from (the
embedded server, or a ``LAB_DATABASE_URL`` the soak starts for itself). After each try: the exit code,
the seconds from signal to exit, stderr must be exactly the one line, and nothing may be left behind:
no process the try started (each carries a marker in its environment), no temp dir, no ``lab_`` schema.
A command that had already decided its outcome (it then blocks both signals, seen in ``SigBlk``, and
exits with its own code) is counted apart and tried again; one killed by the signal, or that went on
with its work, is a failure.

    python tests/soak.py [--tries 50] [--only "run 1"] [--workers 2]

``tests/test_cli.py`` makes one try per command and signal with the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
LAB = [sys.executable, "-m", "lab.cli"]
LIMIT_S = 5.0  # the goal: every command ends within 5 s of the signal
INTERRUPTED = "lab: interrupted; everything the lab started is stopped"
IGNORED: list[tuple[signal.Signals, ...]] = [(), (signal.SIGINT,), (signal.SIGTERM,), (signal.SIGINT, signal.SIGTERM)]

# Every command, and the flags its tries take turns over.
COMMANDS: dict[str, list[list[str]]] = {
    "list": [["list"]],
    "run 1": [["run", "1"], ["run", "1", "--buggy"], ["run", "1", "--fixed"],
              ["run", "1", "--explore", "--sessions", "3"], ["run", "1", "--stress", "--trials", "1000"]],
    "run 2": [["run", "2"], ["run", "2", "--clients", "1000"]],
    "run 3": [["run", "3"], ["run", "3", "--crash"], ["run", "3", "--explore"]],
    "run 4": [["run", "4"], ["run", "4", "--buggy"], ["run", "4", "--fixed"], ["run", "4", "--explore"]],
    "herd --occ": [["herd", "--occ"]],
    "matrix": [["matrix"], ["matrix", "--show", "3/serializable/buggy"]],
    "exercise": [["exercise", "1", "--force"]],
    "check 1": [["check", "1", "fixes/s1_dedup_race.py"]],
    "check 2": [["check", "2", "fixes/s2_retry_herd.py"]],
    "check 3": [["check", "3", "fixes/s3_lost_transition.py"]],
    "check 4": [["check", "4", "fixes/s4_inbox_double_apply.py"]],
}  # fmt: skip
USES_POSTGRES = {name for name in COMMANDS if name not in ("list", "exercise", "check 2")}  # run 2: Brooker's table


@dataclass
class Try:
    """One signalled run: what came back, and what is wrong with it (empty when all is well)."""

    command: str
    argv: list[str]
    sig: signal.Signals
    ignored: tuple[signal.Signals, ...]
    server: str
    landed: bool = True  # False: the command had finished before the signal was sent
    code: int | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


class Site:
    """Where tries run: a temp dir of their own (TMPDIR, the exercise's folder) and a server for URL tries."""

    def __init__(self, root: Path, dsn: str | None) -> None:
        self.root, self.dsn = root, dsn
        self.tmp = root / "tmp"
        self.tmp.mkdir(mode=0o755, exist_ok=True)  # as root, the embedded server runs as nobody

    def env(self, marker: str, url: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "LAB_DATABASE_URL"}
        env |= {"TMPDIR": str(self.tmp), "DOCKER_HOST": "unix:///nonexistent/docker.sock", "LAB_SOAK_TRY": marker,
                "PYTHONPATH": str(ROOT)}
        if url is not None:
            env["LAB_DATABASE_URL"] = url
        return env

    def litter(self) -> list[str]:
        """What a lab may have left in TMPDIR; the embedded server's binary copy is a cache, meant to stay."""
        return sorted(p.name for p in self.tmp.iterdir() if not p.name.startswith("idempotency-lab-pg-"))


def caught(pid: int, *signals: signal.Signals) -> bool | None:
    """Whether the process catches every one of ``signals`` (None once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return all(mask & (1 << (s - 1)) for s in signals)


def blocked(pid: int, sig: signal.Signals) -> bool | None:
    """Whether the process blocks ``sig`` (the lab does once its outcome is decided); None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
    return bool(mask & (1 << (sig - 1)))


def marked(marker: str) -> list[str]:
    """Live processes whose environment carries ``marker``: everything a try started, and nothing else."""
    needle = f"LAB_SOAK_TRY={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    program = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                    found.append(f"{entry.name} {program}")
            except OSError:
                continue
    return found


def _sql(dsn: str, sql: str) -> list[str]:
    """The first column of ``sql``'s rows, from synchronous code."""
    import asyncpg

    async def read() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            return [str(row[0]) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(read())


@contextmanager
def database(dsn: str, name: str) -> Iterator[str]:
    """A database of the try's own on the soak's server, so that tries running together see only their schemas."""
    _sql(dsn, f'CREATE DATABASE "{name}"')
    parts = urlsplit(dsn)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        _sql(dsn, f'DROP DATABASE "{name}" WITH (FORCE)')


def schemas(dsn: str) -> list[str]:
    return sorted(_sql(dsn, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'lab\\_%'"))


def attempt(site: Site, command: str, argv: list[str], sig: signal.Signals, ignored: tuple[signal.Signals, ...],
            server: str, delay: float) -> Try:
    """One try: start, wait until the lab holds its signals, wait ``delay``, signal, and look at what is left."""
    marker = uuid.uuid4().hex
    if server == "url":
        assert site.dsn is not None
        with database(site.dsn, f"soak_{marker}") as url:
            result = _signalled(site, Try(command, argv, sig, ignored, server), marker, url, delay)
            if result.landed and (left := schemas(url)):
                result.problems.append(f"schemas left: {left}")
            return result
    return _signalled(site, Try(command, argv, sig, ignored, server), marker, None, delay)


def _signalled(site: Site, result: Try, marker: str, url: str | None, delay: float) -> Try:
    command, argv, sig, ignored = result.command, result.argv, result.sig, result.ignored

    def ignore() -> None:
        for s in ignored:
            signal.signal(s, signal.SIG_IGN)

    cwd = site.root if command == "exercise" else ROOT
    proc = subprocess.Popen([*LAB, *argv], cwd=cwd, env=site.env(marker, url), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=ignore)
    try:
        while not caught(proc.pid, signal.SIGINT, signal.SIGTERM) and proc.poll() is None:
            time.sleep(0.001)
        time.sleep(delay)
        if proc.poll() is not None:
            result.landed = False
            proc.communicate()
            return result
        sent = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # a terminal's Ctrl-C reaches the whole foreground group
        else:
            proc.send_signal(sig)
        late = blocked(proc.pid, sig) is not False  # the lab had decided its outcome (or was gone already)
        try:
            _, err = proc.communicate(timeout=LIMIT_S * 4)
        except subprocess.TimeoutExpired:
            result.problems.append(f"still running {LIMIT_S * 4:g} s after {sig.name}")
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        result.seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result.code = proc.returncode
    text = err.decode(errors="replace")
    if late and result.code in (0, 1, 2) and INTERRUPTED not in text:
        result.landed = False  # it had finished its work: the signal waits, blocked, while Python exits
        return result
    if result.code != 130:
        result.problems.append(f"exit {result.code}")
    if result.seconds > LIMIT_S:
        result.problems.append(f"took {result.seconds:.1f} s")
    if text.splitlines() != [INTERRUPTED]:
        result.problems.append(f"stderr {text[-300:]!r}")
    deadline = time.monotonic() + 2  # a server's backends leave a moment after their postmaster
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        result.problems.append(f"left running: {left}")
    # A try of another worker may be creating or removing its own dirs right now (removing a cluster
    # takes a while, and lab.pid may go first): what is still there after a grace period is litter.
    deadline = time.monotonic() + 2
    while (litter := [n for n in site.litter() if n not in _in_use(site)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    if litter:
        result.problems.append(f"left in TMPDIR: {[_shown(site.tmp / name) for name in litter]}")
    return result


def _shown(path: Path) -> str:
    """A leftover and, for a directory, a few of the names inside and its owner: enough to tell who made it."""
    inside = sorted(p.name for p in path.iterdir())[:5] if path.is_dir() else []
    try:
        owner = int((path / "lab.pid").read_text())
        program = Path(f"/proc/{owner}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        inside.append(f"owner {owner}: {program[-80:] or 'a zombie'}")
    except (OSError, ValueError):
        pass
    return f"{path.name} {inside}" if inside else path.name


def _in_use(site: Site) -> set[str]:
    """Temp dirs whose owner (the pid in lab.pid) is alive: another worker's try, still running."""
    alive = set()
    for d in site.tmp.iterdir():
        try:
            os.kill(int((d / "lab.pid").read_text()), 0)
            alive.add(d.name)
        except (OSError, ValueError):
            continue
    return alive


@contextmanager
def site(root: Path) -> Iterator[Site]:
    """A site with a server of its own for the URL tries, started the way the lab starts one."""
    sys.path.insert(0, str(ROOT))
    root.chmod(0o755)  # as root, the embedded server runs as nobody, and must reach its dir
    os.environ["TMPDIR"] = str(root / "server")
    (root / "server").mkdir(mode=0o755, exist_ok=True)
    tempfile.tempdir = None
    from lab.postgres.provision import provision

    with provision({"DOCKER_HOST": "unix:///nonexistent/docker.sock"}) as pg:
        yield Site(root, pg.dsn)


def first_landed(site: Site, command: str, sig: signal.Signals, ignored: tuple[signal.Signals, ...]) -> Try:
    """One try of the command's first flags on the embedded server, sooner if it was finishing (make test's share)."""
    for delay in (0.3, 0.1, 0.0):
        result = attempt(site, command, COMMANDS[command][0], sig, ignored, "embedded", delay)
        if result.landed:
            break
    return result


def soak(commands: Sequence[str], tries: int, workers: int, root: Path) -> list[Try]:
    """``tries`` landed signals per command and signal, each with a random moment to land in."""
    results: list[Try] = []
    with site(root) as where, ThreadPoolExecutor(workers) as pool:
        for command in commands:
            window = _window(where, command)
            for sig in (signal.SIGINT, signal.SIGTERM):
                landed, n = 0, 0
                while landed < tries and n < tries * 6:
                    batch = []
                    for i in range(n, n + min(workers, tries - landed)):
                        server = "url" if command in USES_POSTGRES and i % 2 else "embedded"
                        argv = COMMANDS[command][i % len(COMMANDS[command])]
                        ignored = IGNORED[(i // 2) % len(IGNORED)]
                        batch.append(pool.submit(attempt, where, command, argv, sig, ignored, server,
                                                 random.uniform(0, window)))
                    n += len(batch)
                    for future in batch:
                        result = future.result()
                        results.append(result)
                        landed += result.landed
                        if result.problems:
                            print(f"  ✗ {_described(result)}", flush=True)
                _summarise(command, sig, [r for r in results if r.command == command and r.sig == sig])
    return results


def _window(where: Site, command: str) -> float:
    """How long the command runs once it holds its signals (its first flags, unsignalled), capped at 3 s."""
    env = where.env(uuid.uuid4().hex, None)
    cwd = where.root if command == "exercise" else ROOT
    proc = subprocess.Popen([*LAB, *COMMANDS[command][0]], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not caught(proc.pid, signal.SIGINT, signal.SIGTERM) and proc.poll() is None:
        time.sleep(0.001)
    started = time.monotonic()
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait()
    return min(3.0, (time.monotonic() - started) * 0.4)


def _described(result: Try) -> str:
    return (f"{' '.join(result.argv)} {result.sig.name} ignoring {_names(result.ignored)} ({result.server}):"
            f" {'; '.join(result.problems)}")


def _names(signals: tuple[signal.Signals, ...]) -> str:
    return "+".join(s.name for s in signals) or "nothing"


def _summarise(command: str, sig: signal.Signals, tries: list[Try]) -> None:
    landed = [t for t in tries if t.landed]
    codes = Counter(t.code for t in landed)
    worst = max((t.seconds for t in landed), default=0.0)
    bad = sum(1 for t in landed if t.problems)
    print(f"{command:<11} {sig.name:<7} {len(landed) - bad:>3} of {len(landed):>3} clean"
          f"  exits {dict(sorted(codes.items(), key=lambda kv: str(kv[0])))}"
          f"  worst {worst:.2f} s  ({len(tries) - len(landed)} finished before the signal)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=50, help="landed signals per command and signal (default 50)")
    parser.add_argument("--only", action="append", choices=list(COMMANDS), help="one command (repeatable)")
    parser.add_argument("--workers", type=int, default=2, help="tries at a time (default 2)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # killed, the soak still stops its server
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lab-soak-") as root:
        results = soak(args.only or list(COMMANDS), args.tries, args.workers, Path(root))
    landed = [t for t in results if t.landed]
    bad = [t for t in landed if t.problems]
    worst = max((t.seconds for t in landed), default=0.0)
    for failed in bad:  # again at the end, where a CI log's tail shows it
        print(f"  ✗ {_described(failed)}")
    print(f"soak: {len(landed) - len(bad)} of {len(landed)} signalled tries clean, worst exit {worst:.2f} s,"
          f" {time.monotonic() - started:.0f} s in all")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
