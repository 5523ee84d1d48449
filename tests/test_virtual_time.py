"""The virtual-time loop: timers fire instantly and in order, randomness is seeded, the world is shut out."""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import threading
import warnings
from collections.abc import Awaitable, Callable

import pytest

from lab.engine.virtual_time import DeadlockError, RealIOError, Stopped, run_virtual, stop_when


def test_sleeps_move_the_clock_by_exactly_their_delay() -> None:
    """A sleep returns at once, and the loop's clock reads what a real clock would have read."""

    async def sleeper() -> list[float]:
        loop = asyncio.get_running_loop()
        seen = []
        for delay in (0.2, 0.4, 30.0):
            await asyncio.sleep(delay)
            seen.append(loop.time())
        return seen

    assert run_virtual(sleeper, seed=0) == pytest.approx([0.2, 0.6, 30.6])


def test_concurrent_timers_fire_in_deadline_order() -> None:
    """Tasks wake in the order of their deadlines, whatever order they started sleeping in."""
    woke: list[str] = []

    async def nap(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        woke.append(name)

    async def main() -> None:
        await asyncio.gather(nap("late", 3.0), nap("early", 1.0), nap("middle", 2.0))

    run_virtual(main, seed=0)
    assert woke == ["early", "middle", "late"]


def test_a_seed_repeats_the_run_and_the_callers_random_is_left_alone() -> None:
    """The same seed draws the same module-level random numbers; the caller's sequence is restored."""

    async def draw() -> list[float]:
        return [random.uniform(0, 1) for _ in range(3)]

    random.seed(42)
    expected_next = random.random()
    random.seed(42)
    first = run_virtual(draw, seed=7)
    assert run_virtual(draw, seed=7) == first
    assert run_virtual(draw, seed=8) != first
    assert random.random() == expected_next


@pytest.mark.parametrize(
    "io",
    [
        lambda: asyncio.open_connection("127.0.0.1", 5432),
        lambda: asyncio.create_subprocess_exec("true"),
        lambda: asyncio.to_thread(print, "from a thread"),
        lambda: asyncio.get_running_loop().getaddrinfo("localhost", 80),
    ],
    ids=["socket", "subprocess", "thread", "dns"],
)
def test_real_io_is_refused_with_a_sentence(io: Callable[[], Awaitable[object]]) -> None:
    """Sockets, subprocesses, threads and DNS raise RealIOError instead of touching the machine."""

    async def main() -> None:
        await io()

    with pytest.raises(RealIOError, match="real I/O"):
        run_virtual(main, seed=0)


def test_waiting_on_nothing_is_a_deadlock_not_a_hang() -> None:
    """A task awaiting a future nobody resolves raises at once instead of blocking forever."""

    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(DeadlockError):
        run_virtual(main, seed=0)


def test_runaway_code_is_stopped_at_the_virtual_deadline() -> None:
    """A loop that sleeps forever ends with TimeoutError once max_virtual_s of virtual time has passed."""

    async def forever() -> None:
        attempts = 0
        while attempts >= 0:  # a retry loop that never gives up
            attempts += 1
            await asyncio.sleep(60)

    with pytest.raises(TimeoutError):
        run_virtual(forever, seed=0, max_virtual_s=3600)


def test_tasks_left_running_are_cancelled_at_the_end() -> None:
    """A background task the coroutine forgot is cancelled, not left pending on a closed loop."""
    cancelled: list[bool] = []

    async def background() -> None:
        try:
            await asyncio.sleep(1000)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> str:
        forgotten = asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(0)
        assert not forgotten.done()
        return "done"

    assert run_virtual(main, seed=0) == "done"
    assert cancelled == [True]


def test_a_virtual_run_stops_at_once_when_its_context_says_so() -> None:
    """Loops made where `stop_when` holds an event stop at their next turn once it is set (Ctrl-C of `lab run 2`).

    `lab run 2` runs its herd in a worker thread; without this, asyncio.run waited for a 1000-client
    simulation to finish after Ctrl-C, 5 to 9 s on a loaded machine.
    """
    stop = threading.Event()
    turns = 0

    async def runs_for_ever() -> None:
        nonlocal turns
        while True:
            turns += 1
            if turns == 10:
                stop.set()  # as the journey does when its task is cancelled
                # clients whose tasks have not started yet: they must be cancelled, not left unawaited
                await asyncio.gather(*(asyncio.sleep(1) for _ in range(100)))
            await asyncio.sleep(1)

    unawaited: list[str] = []  # "coroutine ... was never awaited", printed after the lab's one line
    token, hook = stop_when.set(stop), sys.unraisablehook
    sys.unraisablehook = lambda unraisable: unawaited.append(str(unraisable.exc_value))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(Stopped):
                run_virtual(runs_for_ever, seed=1)
            gc.collect()
    finally:
        stop_when.reset(token)
        sys.unraisablehook = hook
    assert turns == 10
    assert unawaited == []


def test_a_stop_that_lands_during_the_clean_up_lets_the_clean_up_finish() -> None:
    """Set while the run cancels what it left (the herd was done; Ctrl-C came as its loop closed), a stop must
    not cut the clean-up: cut, it left asyncio's `shutdown_asyncgens` never awaited, and that warning was
    printed after the lab's one line (make soak, `run 2`). Here a forgotten task's cancellation sets it."""
    stop = threading.Event()

    async def forgotten() -> None:
        try:
            await asyncio.sleep(1000)
        except asyncio.CancelledError:
            stop.set()  # as the journey does, from the main thread, at the worst moment
            raise

    async def main() -> str:
        asyncio.get_running_loop().create_task(forgotten())
        await asyncio.sleep(0)
        return "done"

    unawaited: list[str] = []
    token, hook = stop_when.set(stop), sys.unraisablehook
    sys.unraisablehook = lambda unraisable: unawaited.append(str(unraisable.exc_value))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert run_virtual(main, seed=1) == "done"
            gc.collect()
    finally:
        stop_when.reset(token)
        sys.unraisablehook = hook
    assert stop.is_set()
    assert unawaited == []
