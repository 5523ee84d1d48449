"""The step scheduler: concurrent sessions advanced one outside-world step at a time.

Each session is an asyncio task running a handler. Every call a handler makes to the outside world
(a SQL statement, a provider call) goes through :meth:`Scheduler.step`, which parks the session at a
gate until a :class:`Chooser` says it is that session's turn. Because exactly one step is in flight
at a time (plus any that are waiting on a lock), a schedule replays the same way every time.

Borrowed from PostgreSQL's isolation tester (``src/test/isolation/isolationtester.c``): a step whose
backend waits on a lock held by another session is detected with
``pg_isolation_test_session_is_blocked`` and shown ``<waiting ...>``; the other sessions go on, and the
step is shown ``<... completed>`` once it finishes. Like ``trio.testing.Sequencer`` it fails loudly:
a schedule that names a session which cannot move raises :class:`ScheduleError`, never a fallback.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import asyncpg

from lab.engine.conflicts import ANYTHING, CRASH, Catalog, Footprint
from lab.engine.trace import Event, Trace

T = TypeVar("T")

#: How long a released step may run before we ask the server whether it is waiting on a lock.
_BLOCK_POLL_S = 0.002


class ScheduleError(Exception):
    """A schedule could not be honoured as written (a session named out of turn, a replay diverged)."""


class HandlerHung(Exception):
    """A session neither took its next step nor finished within the step timeout."""

    def __init__(self, session: str, timeout: float, doing: str) -> None:
        super().__init__(f"{session} made no progress for {timeout:g} s ({doing})")
        self.session = session


@dataclass(frozen=True)
class Crash:
    """A schedule event: terminate the session's backends and cancel its task at a step boundary."""

    session: str


Choice = str | Crash


class Chooser(Protocol):
    """Decides which session takes the next step."""

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice: ...


@dataclass
class _Session:
    name: str
    task: asyncio.Task[Any] | None = None
    state: str = "running"  # running | gate | blocked | done | crashed; changed by the scheduler only
    finished: bool = False  # set by the session's own task; the scheduler reads it when it settles
    pending: str = ""
    footprint: Footprint = ANYTHING  # what the pending step may touch (lab.engine.conflicts)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    moved: asyncio.Event = field(default_factory=asyncio.Event)
    step_pid: int | None = None
    row: int | None = None
    outcome: tuple[str, bool] | None = None  # (rendered result, is_error) of the step in flight
    pids: set[int] = field(default_factory=set)
    result: Any = None
    error: BaseException | None = None


_current: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("lab_session", default=None)
_running: contextvars.ContextVar[Scheduler | None] = contextvars.ContextVar("lab_scheduler", default=None)


def running() -> Scheduler | None:
    """The scheduler asking a chooser to choose: how a chooser (under any wrapper) reads the pending steps."""
    return _running.get()


def enter_session(name: str) -> None:
    """Name the current task as a session without gating it (stress mode), so the ledger can tell who called."""
    _current.set(_Session(name))


def current_session() -> str | None:
    """Name of the session whose handler is running in this task, if any."""
    session = _current.get()
    return session.name if session else None


@dataclass
class SessionResult:
    """How a session's handler ended: its return value, its exception, or a crash."""

    name: str
    result: Any = None
    error: BaseException | None = None
    crashed: bool = False


class Scheduler:
    """Runs handlers as sessions whose every step waits for its turn."""

    def __init__(
        self, monitor: asyncpg.Connection, *, step_timeout: float = 5.0, catalog: Catalog | None = None,
        strong: bool = False,
    ) -> None:
        """``catalog`` (the scenario schema's tables) lets the db give each statement its footprint, for the
        reduction; without it every step may touch everything. ``strong``: the sessions' transactions run
        at REPEATABLE READ or SERIALIZABLE, where every step does."""
        self._monitor = monitor
        self._step_timeout = step_timeout
        self.catalog = catalog
        self.strong = strong
        self.round = 0
        self._sessions: dict[str, _Session] = {}
        self._closing = False  # the run is over (or cancelled): no gate will open again
        self._refused: Exception | None = None
        self.trace = Trace()

    # -- called from inside handlers (through the proxy and the provider) -------------------------

    def refuse(self, exc: Exception) -> None:
        """A call the lab cannot run as asyncpg would: the run ends with ``exc``, whatever the handler did with it."""
        if self._refused is None:
            self._refused = exc

    def register_pid(self, pid: int) -> None:
        """Remember a backend the current session uses, so a crash can terminate it."""
        session = _current.get()
        if session is not None:
            session.pids.add(pid)

    async def step(
        self,
        text: str,
        action: Callable[[], Awaitable[T]],
        *,
        pid: int | None,
        render: Callable[[T], str],
        gated: bool = True,
        footprint: Footprint | None = None,
    ) -> T:
        """Wait for this session's turn, then perform one step and record it on the trace.

        ``gated=False`` is for what the client library sends on its own (asyncpg's reset when a
        connection goes back to the pool): it runs at once, inside the turn the session is taking,
        and is not recorded.
        """
        session = _current.get()
        if session is None or session.name not in self._sessions:
            return await action()  # not a scheduled session (set-up code, the invariant check)
        if session.state == "crashed" or self._closing:
            # A dead process sends nothing: a ROLLBACK on the way out (its client may not have seen the
            # terminated backend yet) must not park at a gate that will never open. Nor may one taken by
            # a session cancelled because the run ended early (Ctrl-C, a hung step): nobody chooses again.
            raise asyncio.CancelledError
        if not gated:
            return await action()
        session.pending = text
        session.footprint = footprint or ANYTHING
        session.moved.set()
        await session.go.wait()
        session.go.clear()
        session.step_pid = pid
        try:
            value = await action()
        except Exception as exc:
            session.outcome = (render_error(exc), True)
            raise
        finally:
            session.step_pid = None
        session.outcome = (render(value), False)
        return value

    # -- driving -----------------------------------------------------------------------------------

    def runnable(self) -> list[str]:
        """The sessions at their gate, in the order a chooser is given them."""
        return [s.name for s in self._sessions.values() if s.state == "gate"]

    def pending(self, name: str) -> Footprint:
        """What the session's next step may touch (it is waiting at its gate)."""
        return self._sessions[name].footprint

    async def run(self, handlers: dict[str, Callable[[], Awaitable[Any]]], chooser: Chooser) -> list[SessionResult]:
        """Run every handler to completion, one step at a time, in the order the chooser picks."""
        self._sessions = {name: _Session(name) for name in handlers}
        self._closing = False
        self._refused = None
        self.round += 1
        token = _running.set(self)
        for name, handler in handlers.items():
            session = self._sessions[name]
            session.task = asyncio.create_task(self._run_session(session, handler), name=name)
        try:
            for session in self._sessions.values():
                await self._settle(session)
            while True:
                runnable = [s.name for s in self._sessions.values() if s.state == "gate"]
                blocked = [s.name for s in self._sessions.values() if s.state == "blocked"]
                if not runnable and not blocked:
                    break
                if not runnable:
                    await self._wait_for_blocked()
                    continue
                choice = chooser.choose(runnable, blocked)
                if isinstance(choice, Crash):
                    await self._crash(self._named(choice.session, runnable, blocked, crash=True))
                else:
                    await self._advance(self._named(choice, runnable, blocked, crash=False))
        except (HandlerHung, ScheduleError) as exc:
            if self._refused is not None:
                raise self._refused from exc  # the refused call is why the handler went astray
            raise
        finally:
            _running.reset(token)
            await self._cancel_all()
        if self._refused is not None:
            raise self._refused
        return [
            SessionResult(s.name, s.result, s.error, crashed=s.state == "crashed") for s in self._sessions.values()
        ]

    def _named(self, name: str, runnable: Sequence[str], blocked: Sequence[str], *, crash: bool) -> _Session:
        if name not in self._sessions:
            raise ScheduleError(f"schedule names {name}, but the sessions are {', '.join(self._sessions)}")
        if name in runnable or (crash and name in blocked):
            return self._sessions[name]
        state = self._sessions[name].state
        why = {"blocked": "waiting on a lock", "done": "finished", "crashed": "crashed"}.get(state, state)
        raise ScheduleError(
            f"schedule names {name}, but {name} has {why} (can move: {', '.join(runnable) or 'none'})"
            if state != "blocked"
            else f"schedule names {name}, but {name} is {why} (can move: {', '.join(runnable) or 'none'})"
        )

    async def _run_session(self, session: _Session, handler: Callable[[], Awaitable[Any]]) -> None:
        _current.set(session)
        try:
            session.result = await handler()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            session.error = exc
        finally:
            session.finished = True
            session.moved.set()

    async def _advance(self, session: _Session) -> None:
        """Release one step, then let every moving session come to rest, in a fixed order."""
        session.row = self.trace.add(session.name, session.pending)
        event = Event(session.name, session.footprint, self.round, session.row)
        self.trace.events.append(event)
        session.state = "running"
        session.moved.clear()
        session.go.set()
        await self._settle(session)
        event.blocked = session.state == "blocked"
        for other in self._sessions.values():
            if other is not session and other.state == "blocked":
                await self._settle(other)
                if other.state != "blocked":
                    event.woke.append(other.name)

    async def _settle(self, session: _Session) -> None:
        """Wait until the session is at a gate, finished, or waiting on a lock; record what it did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._step_timeout
        was_blocked = session.state == "blocked"
        session.state = "running" if was_blocked else session.state
        asked = not was_blocked
        while True:
            if session.moved.is_set():
                session.moved.clear()
                session.state = "done" if session.finished else "gate"
                self._record(session, was_blocked)
                return
            if not asked:
                # Still waiting on the same lock? Ask at once rather than after a poll interval: each
                # step otherwise cost every waiting session 2 ms (a 3-session lock queue: 17 -> 5 ms a run).
                asked = True
                if session.step_pid is not None and await self._is_blocked(session.step_pid):
                    session.state = "blocked"
                    return
                continue
            try:
                # asyncio.timeout, not wait_for: wait_for wraps the wait in a task of its own, which
                # costs two more loop turns a step (make bench: ~80 -> ~65 turns a schedule).
                async with asyncio.timeout(_BLOCK_POLL_S):
                    await session.moved.wait()
                continue
            except TimeoutError:
                pass
            if session.step_pid is not None and await self._is_blocked(session.step_pid):
                session.state = "blocked"
                if not was_blocked and session.row is not None:
                    self.trace.mark_waiting(session.row)
                return
            if loop.time() > deadline:
                raise HandlerHung(session.name, self._step_timeout, session.pending or "between steps")

    def _record(self, session: _Session, was_blocked: bool) -> None:
        if session.outcome is None:
            return
        text, is_error = session.outcome
        session.outcome = None
        if was_blocked:
            self.trace.add(session.name, "<... completed>", result=text, error=is_error)
        elif session.row is not None:
            self.trace.finish(session.row, text, error=is_error)

    async def _is_blocked(self, pid: int) -> bool:
        pids = [p for s in self._sessions.values() for p in s.pids]
        blocked: bool = await self._monitor.fetchval(
            "SELECT pg_catalog.pg_isolation_test_session_is_blocked($1, $2::int[])", pid, pids
        )
        return blocked

    async def _wait_for_blocked(self) -> None:
        """Every live session waits on a lock: only the server's deadlock detector can move one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._step_timeout
        while loop.time() < deadline:
            for session in self._sessions.values():
                if session.state == "blocked":
                    await self._settle(session)
                    if session.state != "blocked":
                        if self.trace.events:  # the deadlock detector moved it, after the last step taken
                            self.trace.events[-1].woke.append(session.name)
                        return
        stuck = ", ".join(s.name for s in self._sessions.values() if s.state == "blocked")
        raise HandlerHung(stuck, self._step_timeout, "every session waiting on a lock")

    async def _crash(self, session: _Session) -> None:
        """Kill the session's backends first, so its open transaction is rolled back, then its task."""
        row = self.trace.add(session.name, "✗ crash: backend terminated, task cancelled", result=None)
        self.trace.events.append(Event(session.name, CRASH, self.round, row))
        session.state = "crashed"
        if session.pids:
            await self._monitor.execute(
                "SELECT pg_catalog.pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", list(session.pids)
            )
            await self._gone(session)
        if session.task is not None:
            session.task.cancel()
            await asyncio.gather(session.task, return_exceptions=True)

    async def _gone(self, session: _Session) -> None:
        """Wait until the terminated backends have rolled back and left, so no other step sees their locks.

        ``pg_terminate_backend(pid, timeout)`` waits too, but it polls every 100 ms: a crash cost ~100 ms.
        A backend leaves pg_stat_activity only after it aborted its transaction and released its locks.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._step_timeout
        query = "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid = ANY($1::int[])"
        while await self._monitor.fetchval(query, list(session.pids)):
            if loop.time() > deadline:
                raise HandlerHung(session.name, self._step_timeout, "its terminated backend still there")
            await asyncio.sleep(0.0005)

    async def _cancel_all(self) -> None:
        self._closing = True
        for session in self._sessions.values():
            if session.task is not None and not session.task.done():
                session.task.cancel()
        await asyncio.gather(*(s.task for s in self._sessions.values() if s.task), return_exceptions=True)


def render_error(exc: BaseException) -> str:
    """One line for an exception, as psql would print a server error."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"ERROR: {exc.args[0] if exc.args else exc}"
    return f"{type(exc).__name__}: {exc}"
