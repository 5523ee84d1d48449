"""An asyncio event loop whose clock only moves when every task is waiting for a timer.

Retry storms play out over seconds (a 30 s cap, six attempts), and a thousand clients would make a
test suite crawl in real time. On this loop ``asyncio.sleep(30)`` returns at once while the loop's
``time()`` says thirty seconds have passed, so the arrivals a provider records are exactly those a
real client would produce, and a seed makes every run repeatable.

Prior art: trio's ``MockClock(autojump_threshold=0)`` jumps the clock whenever all tasks are asleep,
which is what this loop does for asyncio; asynctest's ``ClockedTestCase.advance`` and the looptime
plugin fake asyncio's clock too, but drive it by hand or by patching a real loop that can still
reach the network. Here the loop owns no selector at all, so real I/O cannot happen by accident.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


class RealIOError(RuntimeError):
    """Raised when code running in virtual time tries to touch the real world."""


class DeadlockError(RuntimeError):
    """Nothing is ready and no timer is pending: the program waits for something that never comes."""


class Stopped(BaseException):
    """The run was stopped from outside (``stop_when``): a BaseException, so no ``except Exception`` hides it."""


#: An event that, once set, stops every loop made in this context at its next turn. ``lab run 2``
#: runs its simulations in a worker thread (asyncio.to_thread carries the context there); on Ctrl-C
#: asyncio.run would otherwise wait for a thousand clients to finish before the lab could exit.
stop_when: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("lab_virtual_stop", default=None)


class _NoSelector:
    """Stands in for the selector: instead of blocking until a deadline, jump the clock to it."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:  # BaseEventLoop passes None only when nothing is ready nor scheduled
            raise DeadlockError("virtual time: every task is waiting, but not for a timer (a future nobody resolves?)")
        if timeout > 0:
            self._loop._jump_to_next_timer(timeout)
        return []

    def close(self) -> None:
        pass


class VirtualTimeLoop(asyncio.BaseEventLoop):
    """A loop for simulations: timers fire in order, instantly; sockets, pipes and threads refuse."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._selector = _NoSelector(self)
        self._stop = stop_when.get()

    def _run_once(self) -> None:
        if self._stop is not None and self._stop.is_set():
            self._stop = None  # once: the caller's clean-up must still run its tasks' cancellations
            raise Stopped("virtual time: stopped from outside")
        super()._run_once()  # type: ignore[misc]  # asyncio internals: one turn of the loop

    def stop_no_more(self) -> None:
        """The clean-up runs whole: a stop that cut it would leave ``shutdown_asyncgens`` never awaited."""
        self._stop = None

    def time(self) -> float:
        return self._now

    def _jump_to_next_timer(self, timeout: float) -> None:
        # Land exactly on the timer's deadline rather than adding ``timeout`` to the clock, so that
        # 0.2 + 0.4 lands where the handler asked for it and 50 ms buckets do not drift.
        when: float = self._scheduled[0]._when  # type: ignore[attr-defined]  # asyncio internals
        self._now = when if when - self._now <= timeout else self._now + timeout

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # nobody sleeps in select, so nobody needs waking

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RealIOError(
            "virtual time: real I/O (sockets, pipes, subprocesses, threads, DNS) is not allowed here;"
            " the simulated provider is the only outside world"
        )

    # Everything that would reach the operating system. BaseEventLoop would fail on most of these
    # anyway, but with NotImplementedError deep inside asyncio; a learner deserves a sentence.
    sock_recv = sock_recv_into = sock_recvfrom = sock_recvfrom_into = _refuse
    sock_sendall = sock_sendto = sock_connect = sock_accept = sock_sendfile = _refuse
    create_connection = create_server = create_datagram_endpoint = _refuse
    create_unix_connection = create_unix_server = connect_accepted_socket = _refuse
    connect_read_pipe = connect_write_pipe = subprocess_exec = subprocess_shell = _refuse
    remove_reader = remove_writer = getaddrinfo = getnameinfo = sendfile = start_tls = _refuse
    remove_signal_handler = _refuse
    # typeshed spells these with variadic generics that a catch-all cannot match; it refuses them all
    add_reader = add_writer = run_in_executor = add_signal_handler = _refuse  # type: ignore[assignment]


def run_virtual(
    coro_factory: Callable[[], Coroutine[Any, Any, T]],
    *,
    seed: int,
    max_virtual_s: float | None = None,
) -> T:
    """Run ``coro_factory()`` to completion on a fresh virtual-time loop with ``random`` seeded.

    Learners call module-level ``random.uniform``, so the global generator is seeded for the run and
    its previous state restored afterwards: the same seed gives the same jitter, and the caller's own
    random sequence is left as it was. ``max_virtual_s`` bounds runaway code (a retry loop that never
    gives up) by raising ``TimeoutError`` once that much virtual time has passed.

    Must be called from synchronous code: asyncio allows one running loop per thread.
    """
    saved = random.getstate()
    random.seed(seed)
    loop = VirtualTimeLoop()

    async def bounded() -> T:
        if max_virtual_s is None:
            return await coro_factory()
        async with asyncio.timeout(max_virtual_s):
            return await coro_factory()

    try:
        return loop.run_until_complete(bounded())
    finally:
        loop.stop_no_more()
        try:
            _cancel_leftovers(loop)
        finally:
            loop.close()
            random.setstate(saved)


def _cancel_leftovers(loop: VirtualTimeLoop) -> None:
    # Tasks a scenario spawned and forgot would otherwise be destroyed pending, with a warning.
    leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in leftovers:
        task.cancel()
    if leftovers:
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
