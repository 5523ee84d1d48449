"""Grading in a child process the lab watches, so the file under test can neither end, hang nor fool it.

A learner's file runs inside the grader: its top level when it is loaded, its handler under attack.
Whatever it does to that process (``sys.exit(0)``, ``os._exit(0)``, a ``time.sleep`` that freezes the
event loop, closing stdout, catching ``BaseException``, forking, killing its own process group) must
never become the lab's verdict. So ``lab check`` forks the grader, in a session of its own, and the
child reports to the lab over a private pipe: "loaded", a beat every tenth of a second while its event
loop turns, then the rendered report and its exit code. A verdict counts only from the child's own
pid. A child that ends without one, or stops beating, is a ``CannotGrade``: exit 2, one line, naming
the line of the file where it stood (read from a stack dump the lab asks ``faulthandler`` for).

The child is a subreaper (prctl(2)): every process the file starts stays below it, even one that
left for a session of its own and whose parent has exited, and all of them are killed before it.
The lab keeps everything that must be cleaned up (PostgreSQL, the run's schemas, hypothesis's
directory) in its own process, so a child killed at any point leaves nothing behind. As in
Maelstrom, the checker is a separate process from the code it judges.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import json
import os
import re
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import psutil

from lab.errors import LabError
from lab.postgres.provision import die_with_parent
from lab.workshop.grading import CannotGrade
from lab.workshop.submission import where_in

Message = dict[str, Any]
BEAT_S = 0.1  # how often a turning event loop says so
_exit = os._exit  # the real one: in the child, os._exit is replaced by one that says who called it
_DUMP_SIGNAL = signal.SIGUSR1


class Reporter:
    """The child's end: messages to the lab, and the one message the lab sends back ("go")."""

    def __init__(self, out: int, inbox: int) -> None:
        self._out = out
        self._inbox = inbox

    def send(self, kind: str, **fields: Any) -> None:
        data = (json.dumps({"pid": os.getpid(), "kind": kind, **fields}) + "\n").encode()
        while data:
            data = data[os.write(self._out, data):]

    def wait_go(self) -> Message:
        """Block until the lab says go (it has started PostgreSQL meanwhile): what it sent, as a dict."""
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(self._inbox, 65536)
            if not chunk:
                _end(0)  # the lab is gone (or gave up on us): nothing left to do
            data += chunk
        go: Message = json.loads(data)
        return go

    async def heartbeat(self) -> None:
        """Beat while the event loop turns; a handler that blocks the loop stops the beats."""
        while True:
            self.send("beat")
            await asyncio.sleep(BEAT_S)


class Child:
    """The lab's end: a forked grader, what it said, and what its silence means."""

    def __init__(self, pid: int, messages: int, dumps: int, go: int, file: Path) -> None:
        self.pid = pid
        self.file = file
        self._messages = messages
        self._dumps = dumps
        self._go = go
        self._buffer = b""
        self._closed = False  # every writer has closed the pipe
        self._status: int | None = None

    @classmethod
    def start(cls, work: Callable[[Reporter], None], file: Path) -> Child:
        """Fork; the child runs ``work`` and exits without running anything the lab registered (atexit)."""
        messages_r, messages_w = os.pipe()
        dumps_r, dumps_w = os.pipe()
        go_r, go_w = os.pipe()
        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # or the child would print the lab's buffered output a second time
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; coverage cannot follow a fork
            for fd in (messages_r, dumps_r, go_w):
                os.close(fd)
            _run_child(work, Reporter(messages_w, go_r), file, parent, dumps_w)
        for fd in (messages_w, dumps_w, go_r):
            os.close(fd)
        return cls(pid, messages_r, dumps_r, go_w, file)

    def go(self, **fields: Any) -> None:
        with contextlib.suppress(OSError):  # a child already gone says so in expect()
            os.write(self._go, (json.dumps(fields) + "\n").encode())

    def expect(self, kind: str, *, stall: float, doing: str, beats: bool = False) -> Message:
        """The child's next message, which must be ``kind``; else the reason it cannot be graded.

        ``stall`` is how long the child may stay silent (with ``beats``, since its last beat; without,
        in all). ``doing`` names what it was doing, for the message if it stalls.
        """
        deadline = time.monotonic() + stall
        while True:
            message = self._next(timeout=min(BEAT_S, max(0.0, deadline - time.monotonic())))
            if message is None:
                if self._exited():
                    message = self._next(timeout=0)  # what it said just before it went, if anything
                    if message is None:
                        raise CannotGrade(self._ended_without_verdict(doing))
                elif time.monotonic() >= deadline:
                    raise CannotGrade(self._stalled(stall, doing))
                else:
                    continue
            if message["kind"] == "beat":
                if beats:
                    deadline = time.monotonic() + stall
                continue
            if message["kind"] == kind:
                return message
            if message["kind"] in ("cannot", "ended"):
                self._reap()
                raise CannotGrade(str(message["message"]))
            raise LabError(f"the grader sent {message['kind']!r} where the lab expected {kind!r}")

    def stop(self) -> None:
        """Kill the child and everything it started, wherever that went; close the pipes.

        The child is stopped first and killed last: it is a subreaper, so until it dies every process the
        file started is below it, even one in a session of its own whose parent has exited.
        """
        if self._status is None:  # not reaped yet, so the pid is still the child's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGSTOP)  # a stopped process forks nothing more
            kill_descendants(self.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # (a group outlives its leader, and keeps its id from reuse)
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # it may have left its group
        self._reap()
        for fd in (self._messages, self._dumps, self._go):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- reading the pipe ----------------------------------------------------------------------------

    def _next(self, timeout: float) -> Message | None:
        """One message from the child's own pid (a process it forked has another), or None by ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, _, self._buffer = self._buffer.partition(b"\n")
                with contextlib.suppress(ValueError):
                    message = json.loads(line)
                    if isinstance(message, dict) and message.get("pid") == self.pid:
                        return message
            left = max(0.0, end - time.monotonic())
            if self._closed:  # nothing more will come; do not spin on a pipe that is always "ready"
                time.sleep(min(left, 0.01))
                return None
            ready, _, _ = select.select([self._messages], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._messages, 1 << 16)
            self._buffer += chunk
            self._closed = not chunk

    def _exited(self) -> bool:
        if self._status is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == 0:
                    return False
                self._status = status
        return True

    def _reap(self) -> None:
        if self._status is None:
            with contextlib.suppress(ChildProcessError):
                self._status = os.waitpid(self.pid, 0)[1]

    # -- what the silence means -----------------------------------------------------------------------

    def _ended_without_verdict(self, doing: str) -> str:
        status = self._status or 0
        how = (
            f"was killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
            else f"exited with code {os.waitstatus_to_exitcode(status)}"
        )
        return (
            f"{self.file}: while {doing}, the grader's process {how} before giving a verdict: a file under test"
            " must not end, kill or close the process it runs in (os._exit, os.kill, os.abort)"
        )

    def _stalled(self, stall: float, doing: str) -> str:
        """Ask the child for a stack dump, then kill it: the blocking line, in the file's own words."""
        line = self._blocking_line()
        self.stop()
        at = f", line {line[0]}" if line else ""
        code = f" (at `{line[1]}`)" if line and line[1] else ""
        if doing == "importing it":
            return (
                f"{self.file}{at}: importing it did not finish within {stall:g} s{code}: a file's top level runs"
                " for every request, so it may only define things"
            )
        return (
            f"{self.file}{at}: {doing} did not give control back for {stall:g} s{code}: a loop without await, or"
            " a blocking call such as time.sleep? Await the database, and use asyncio.sleep"
        )

    def _blocking_line(self) -> tuple[int, str] | None:
        """The innermost frame of the file in a faulthandler dump of the child, and its source line."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, _DUMP_SIGNAL)
        dump, end = b"", time.monotonic() + 1.0
        while time.monotonic() < end:
            ready, _, _ = select.select([self._dumps], [], [], 0.1 if dump else end - time.monotonic())
            if not ready:
                if dump:
                    break  # a dump, and nothing more for 0.1 s: it is whole
                continue
            chunk = os.read(self._dumps, 1 << 16)
            if not chunk:
                break
            dump += chunk
        return blocking_line(dump.decode(errors="replace"), self.file)


def kill_descendants(pid: int) -> None:
    """SIGKILL every live process below ``pid`` (a subreaper: whatever it started stays below it).

    Each round stops what it finds, then kills it: a stopped process forks nothing more, and what was
    forked before the stop is found by the next round, below its parent or, orphaned, below ``pid``.
    """
    for _ in range(1000):
        try:
            found = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return
        alive = [p for p in found if _alive(p)]
        if not alive:
            return
        for signum in (signal.SIGSTOP, signal.SIGKILL):
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signum)
        time.sleep(0.001)  # the killed become zombies; their children come up to ``pid``


def _alive(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _be_subreaper() -> None:
    """Orphans below this process come back to it rather than to init (prctl(2), Linux 3.4)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER = 36, as in <sys/prctl.h>


def blocking_line(dump: str, file: Path) -> tuple[int, str] | None:
    """``(line, source)`` of the first frame of ``file`` in a faulthandler dump (most recent call first)."""
    resolved = str(file.resolve())
    for match in re.finditer(r'File "(.*)", line (\d+) in ', dump):
        if match.group(1) == resolved:
            number = int(match.group(2))
            lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
            return number, lines[number - 1].strip() if 0 < number <= len(lines) else ""
    return None


def _run_child(work: Callable[[Reporter], None], reporter: Reporter, file: Path, parent: int, dumps: int) -> None:
    """The child's whole life: never returns, never runs the lab's atexit handlers (its server's stop())."""
    status = 0
    try:
        os.setsid()  # a terminal's Ctrl-C reaches the lab alone, which then kills this whole group
        _be_subreaper()  # and whatever the file starts stays below this process, to be killed with it
        die_with_parent(parent)()  # and if the lab is SIGKILLed, this dies with it
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        faulthandler.register(_DUMP_SIGNAL, file=dumps, all_threads=True, chain=False)
        _report_os_exit(reporter, file)
        try:
            work(reporter)
        except LabError as exc:  # CannotGrade included: the one line to show
            reporter.send("cannot", message=str(exc))
        except SystemExit as exc:
            line = where_in(exc, file)
            reporter.send("cannot", message=(
                f"{file}{', ' + line if line else ''}: it called sys.exit({exc.code!r}) (or raised SystemExit),"
                " which ends the process it runs in; a handler answers with a lab.Response or raises an"
                " exception, and a file's top level only defines things"
            ))
        except BaseException as exc:  # anything else the file raised past the grader, or a bug of the lab's
            traceback.print_exc()
            line = where_in(exc, file)
            reporter.send("cannot", message=(
                f"{file}{', ' + line if line else ''}: grading stopped on {type(exc).__name__}: {exc}"
            ))
    except BaseException:  # the pipe itself is broken (the file closed it?): the lab reads the silence
        status = 3
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        _end(status)


def _end(status: int) -> NoReturn:
    """The child's only way out: nothing the file started outlives it."""
    with contextlib.suppress(BaseException):
        kill_descendants(os.getpid())
    _exit(status)


def _report_os_exit(reporter: Reporter, file: Path) -> None:
    """``os._exit`` says who called it before it ends the child: the lab can then name the line."""

    def reported_exit(status: int) -> NoReturn:
        frames = [frame for frame in traceback.extract_stack() if frame.filename == str(file.resolve())]
        at = f", line {frames[-1].lineno}" if frames else ""
        with contextlib.suppress(BaseException):
            reporter.send("ended", message=(
                f"{file}{at}: it called os._exit({status!r}), which ends the process it runs in; a handler"
                " answers with a lab.Response or raises an exception"
            ))
        _end(status)

    os._exit = reported_exit
