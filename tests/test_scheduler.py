"""The scheduler: order recorded and compared exactly, without a database where possible; lock waits and
crashes against the real one."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import asyncpg
import pytest

from lab.engine.scheduler import Crash, HandlerHung, ScheduleError, Scheduler
from lab.engine.schedules import DepthFirst, Schedule, ScriptedChooser
from lab.postgres.workspace import Workspace

COUNTER = "CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL);"
NO_DATABASE = cast(asyncpg.Connection, None)  # steps without a backend pid never ask the server


def sessions(scheduler: Scheduler, steps: dict[str, int], record: list[str]) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Handlers that take ``n`` steps each and append "T1.0", "T1.1", ... as each step runs."""

    def handler(name: str, count: int) -> Callable[[], Awaitable[Any]]:
        async def run() -> str:
            for i in range(count):

                async def act(label: str = f"{name}.{i}") -> str:
                    record.append(label)
                    return label

                await scheduler.step(f"step {i}", act, pid=None, render=str)
            return f"{name} done"

        return run

    return {name: handler(name, count) for name, count in steps.items()}


async def test_strict_schedule_is_followed_exactly() -> None:
    """A strict schedule runs the steps in exactly the order it names."""
    scheduler = Scheduler(NO_DATABASE)
    record: list[str] = []
    chooser = ScriptedChooser(["T2", "T1", "T1", "T2"], strict=True)
    results = await scheduler.run(sessions(scheduler, {"T1": 2, "T2": 2}, record), chooser)
    assert record == ["T2.0", "T1.0", "T1.1", "T2.1"]
    assert scheduler.trace.order() == ["T2", "T1", "T1", "T2"]
    assert [r.result for r in results] == ["T1 done", "T2 done"]


async def test_strict_schedule_naming_a_finished_session_fails_loudly() -> None:
    """Naming a session that has already finished is a ScheduleError that says who could move."""
    scheduler = Scheduler(NO_DATABASE)
    chooser = ScriptedChooser(["T1", "T1", "T1"], strict=True)
    with pytest.raises(ScheduleError, match=r"T1 has finished \(can move: T2\)"):
        await scheduler.run(sessions(scheduler, {"T1": 1, "T2": 1}, []), chooser)


async def test_strict_schedule_that_ends_early_fails_loudly() -> None:
    """A strict schedule too short for the handlers is an error, never a silent completion."""
    scheduler = Scheduler(NO_DATABASE)
    with pytest.raises(ScheduleError, match="still had steps"):
        await scheduler.run(sessions(scheduler, {"T1": 2}, []), ScriptedChooser(["T1"], strict=True))


async def test_unknown_session_in_a_schedule_fails_loudly() -> None:
    """A schedule naming a session that does not exist is rejected with the real names."""
    scheduler = Scheduler(NO_DATABASE)
    with pytest.raises(ScheduleError, match="sessions are T1"):
        await scheduler.run(sessions(scheduler, {"T1": 1}, []), ScriptedChooser(["T9"], strict=True))


async def test_lenient_schedule_skips_turns_that_cannot_be_taken() -> None:
    """A lenient replay skips turns of finished sessions and finishes the rest in name order."""
    scheduler = Scheduler(NO_DATABASE)
    record: list[str] = []
    chooser = Schedule.of(("T1", ""), ("T1", ""), ("T2", "")).chooser(strict=False)
    await scheduler.run(sessions(scheduler, {"T1": 1, "T2": 2}, record), chooser)
    assert record == ["T1.0", "T2.0", "T2.1"]


async def test_depth_first_enumerates_every_interleaving_once() -> None:
    """Two sessions of two steps have C(4,2) = 6 interleavings, each visited exactly once."""
    seen: list[tuple[str, ...]] = []
    chooser: DepthFirst | None = DepthFirst()
    while chooser is not None:
        scheduler = Scheduler(NO_DATABASE)
        record: list[str] = []
        await scheduler.run(sessions(scheduler, {"T1": 2, "T2": 2}, record), chooser)
        seen.append(tuple(record))
        chooser = chooser.next()
    assert len(seen) == 6
    assert len(set(seen)) == 6
    assert all(r.index("T1.0") < r.index("T1.1") and r.index("T2.0") < r.index("T2.1") for r in seen)


async def test_three_sessions_have_ninety_interleavings() -> None:
    """Three sessions of two steps each: 6!/(2!2!2!) = 90 interleavings."""
    runs = 0
    chooser: DepthFirst | None = DepthFirst()
    while chooser is not None:
        scheduler = Scheduler(NO_DATABASE)
        await scheduler.run(sessions(scheduler, {"T1": 2, "T2": 2, "T3": 2}, []), chooser)
        runs += 1
        chooser = chooser.next()
    assert runs == 90


async def test_a_handler_that_hangs_is_stopped_and_named() -> None:
    """A session that neither steps nor finishes within the step timeout raises HandlerHung naming it."""
    scheduler = Scheduler(NO_DATABASE, step_timeout=0.2)

    async def hangs() -> None:
        import asyncio

        await asyncio.Event().wait()

    with pytest.raises(HandlerHung, match=r"T1 made no progress for 0\.2 s"):
        await scheduler.run({"T1": hangs}, ScriptedChooser([], strict=False))


async def test_a_crash_cancels_the_session_at_its_step_boundary() -> None:
    """A crash stops the session before its next step; the others carry on and finish."""
    scheduler = Scheduler(NO_DATABASE)
    record: list[str] = []
    chooser = ScriptedChooser(["T1", Crash("T1"), "T2", "T2"], strict=True)
    results = await scheduler.run(sessions(scheduler, {"T1": 2, "T2": 2}, record), chooser)
    assert record == ["T1.0", "T2.0", "T2.1"]
    assert [(r.name, r.crashed) for r in results] == [("T1", True), ("T2", False)]
    assert "crash" in scheduler.trace.rows[1].text


async def test_a_crashed_session_cannot_step_on_its_way_out() -> None:
    """A step attempted after the crash (a ROLLBACK in a finally) is refused, so the crash never hangs."""
    scheduler = Scheduler(NO_DATABASE, step_timeout=1)
    record: list[str] = []

    async def rolls_back() -> None:
        try:
            await scheduler.step("UPDATE", lambda: _note(record, "UPDATE"), pid=None, render=str)
            await scheduler.step("COMMIT", lambda: _note(record, "COMMIT"), pid=None, render=str)
        except BaseException:
            await scheduler.step("ROLLBACK", lambda: _note(record, "ROLLBACK"), pid=None, render=str)
            raise

    results = await scheduler.run({"T1": rolls_back}, ScriptedChooser(["T1", Crash("T1")], strict=True))
    assert record == ["UPDATE"]
    assert results[0].crashed


async def _note(record: list[str], text: str) -> str:
    record.append(text)
    return text


async def test_a_handler_exception_is_the_sessions_outcome() -> None:
    """An exception raised by a handler ends only that session and is reported as its result."""
    scheduler = Scheduler(NO_DATABASE)

    async def fails() -> None:
        raise ValueError("bad request")

    results = await scheduler.run({"T1": fails}, ScriptedChooser([], strict=False))
    assert isinstance(results[0].error, ValueError)


async def test_a_lock_wait_is_shown_waiting_then_completed(workspace: Workspace) -> None:
    """A step blocked on another session's row lock is marked <waiting ...>, others go on, then it completes."""
    from lab.engine.proxy import ConnectionBank

    await workspace.install(COUNTER, "INSERT INTO counter VALUES (1, 0);")
    bank = ConnectionBank(workspace.connect)
    monitor = await workspace.connect()
    try:
        scheduler = Scheduler(monitor)

        def bump(name: str) -> Callable[[], Awaitable[Any]]:
            async def run() -> None:
                db = await bank.db_for(name, scheduler)
                async with db.acquire() as conn, conn.transaction():
                    await conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")

            return run

        handlers = {"T1": bump("T1"), "T2": bump("T2")}
        # T1 BEGIN, T1 UPDATE, T2 BEGIN, T2 UPDATE (blocks), T1 COMMIT (T2 completes), T2 COMMIT
        chooser = ScriptedChooser(["T1", "T1", "T2", "T2", "T1", "T2"], strict=True)
        await scheduler.run(handlers, chooser)
        rows = [(r.session, r.text, r.waiting) for r in scheduler.trace.rows]
        assert rows == [
            ("T1", "BEGIN", False),
            ("T1", "UPDATE counter SET n = n + 1 WHERE id = 1", False),
            ("T2", "BEGIN", False),
            ("T2", "UPDATE counter SET n = n + 1 WHERE id = 1", True),
            ("T1", "COMMIT", False),
            ("T2", "<... completed>", False),
            ("T2", "COMMIT", False),
        ]
        assert await workspace.admin.fetchval(f"SELECT n FROM {workspace.schema}.counter") == 2
    finally:
        await bank.close()
        await monitor.close()


async def test_a_crash_rolls_back_the_sessions_open_transaction(workspace: Workspace) -> None:
    """Crashing a session inside its transaction terminates its backend, so its write is rolled back."""
    from lab.engine.proxy import ConnectionBank

    await workspace.install(COUNTER, "INSERT INTO counter VALUES (1, 0);")
    bank = ConnectionBank(workspace.connect)
    monitor = await workspace.connect()
    try:
        scheduler = Scheduler(monitor)
        db = await bank.db_for("T1", scheduler)

        async def bump() -> None:
            async with db.acquire() as conn, conn.transaction():
                await conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")

        results = await scheduler.run({"T1": bump}, ScriptedChooser(["T1", "T1", Crash("T1")], strict=True))
        assert results[0].crashed
        assert await workspace.admin.fetchval(f"SELECT n FROM {workspace.schema}.counter") == 0
    finally:
        await bank.close()
        await monitor.close()


async def test_cancelling_the_run_ends_a_session_that_steps_on_its_way_out() -> None:
    """A cancelled run ends even if a handler takes a step while unwinding (a ROLLBACK in ``except BaseException``).

    Ctrl-C cancels the task driving the scheduler; each session is then cancelled once. A step taken
    while unwinding must not park at a gate that nobody will ever open again.
    """
    scheduler = Scheduler(NO_DATABASE)
    started = asyncio.Event()

    async def rolls_back_on_the_way_out() -> None:
        async def act() -> None:
            started.set()
            await asyncio.Event().wait()  # a statement in flight when Ctrl-C comes

        try:
            await scheduler.step("BEGIN; UPDATE ...", act, pid=None, render=str)
        except BaseException:
            await scheduler.step("ROLLBACK", act, pid=None, render=str)
            raise

    run = asyncio.create_task(scheduler.run({"T1": rolls_back_on_the_way_out}, DepthFirst()))
    await started.wait()
    run.cancel()
    done, _ = await asyncio.wait({run}, timeout=2)
    assert run in done and run.cancelled()
