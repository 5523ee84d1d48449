"""Every interleaving, fewest preemptions first: the smallest failing run is the first one found.

Depth-first search (``lab.schedules.DepthFirst``) visits interleavings in an order that says nothing
about how simple they are, so it must finish before it can name the simplest failure. Here the same
tree is walked cheapest first. A *preemption* is a switch away from a session that could have gone
on; switching when it finished or waits on a lock is free. Each run follows a fixed prefix of
choices, then lets the session that moved last go on ("no preemption") while it can. A run's
children deviate at one later choice point each, so every interleaving is still run exactly once,
and a priority queue on the preemption count runs all interleavings with k preemptions before any
with k + 1.

The idea is CHESS's iterative context bounding (Musuvathi and Qadeer, "Iterative context bounding
for systematic testing of multithreaded programs", PLDI 2007): most concurrency bugs need only one
or two preemptions, so a failing handler is caught after a handful of runs, by its simplest race.

With ``reduction=True`` the same call runs one interleaving per class of equivalent ones instead
(``lab.engine.reduction``, depth-first with sleep sets), and finds the smallest failing run after the
search: the member of a failing class with the fewest preemptions, replayed. The run it shows is the
same kind of smallest; what changes is that it is found after every class, not first, and that a
search cut short by ``limit`` has covered classes in depth-first order, not the cheapest ones.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from lab.engine.reduction import NotReducible, explore_reduced
from lab.engine.scheduler import Choice, Chooser, ScheduleError

R = TypeVar("R")


@dataclass
class _Point:
    options: list[str]
    default: int
    preemptible: bool  # the session that moved last could go on: choosing another one preempts it


class FewestFirst:
    """Follows ``prefix`` (choice indices), then lets the last session go on while it can."""

    def __init__(self, prefix: Sequence[int] = (), expected: Sequence[list[str]] = ()) -> None:
        self.prefix = list(prefix)
        self.expected = list(expected)
        self.points: list[_Point] = []
        self.taken: list[int] = []
        self._last: str | None = None

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        if len(runnable) == 1:
            self._last = runnable[0]
            return runnable[0]
        depth = len(self.points)
        if depth < len(self.expected) and self.expected[depth] != list(runnable):
            raise ScheduleError(
                f"replay diverged at choice {depth}: expected {self.expected[depth]}, got {list(runnable)} "
                "(does the handler depend on something other than the database, like time or randomness?)"
            )
        goes_on = self._last in runnable
        default = runnable.index(self._last) if self._last in runnable else 0
        index = self.prefix[depth] if depth < len(self.prefix) else default
        self.points.append(_Point(list(runnable), default, goes_on))
        self.taken.append(index)
        self._last = runnable[index]
        return self._last

    def preemptions(self) -> int:
        return sum(1 for p, t in zip(self.points, self.taken, strict=True) if p.preemptible and t != p.default)


@dataclass
class Found(Generic[R]):
    """What an exploration ran: how many runs, which failed, and whether every interleaving was run."""

    runs: int = 0
    failing: list[tuple[int, R]] = field(default_factory=list)  # (preemptions, outcome)
    complete: bool = False
    stopped_at: int | None = None  # the preemption count at which a failure of the worst kind stopped it
    reduced: bool = False  # one run per class of equivalent interleavings (lab.engine.reduction)


async def explore(
    run: Callable[[Any], Awaitable[R]],
    verdict: Callable[[R], int | None],
    *,
    limit: int,
    reduction: bool = False,
    twins: Sequence[Sequence[str]] = (),
) -> Found[R]:
    """Run interleavings cheapest first, up to ``limit`` runs.

    ``verdict`` gives a failing run's rank (0: the scenario's own invariant broke) or None when it
    held. Once a rank-0 failure turns up, the runs with as few preemptions are finished and the
    search stops: nothing later can be simpler. Lesser failures do not stop it, so a double charge
    further on is still found and shown before a wrong status code.

    ``reduction``: one run per class of equivalent interleavings (``twins``: sessions sending identical
    requests, see ``lab.engine.reduction``); ``failing`` then holds every failing class, the smallest
    run of the worst rank replayed in place of its class's first run.
    """
    if reduction:
        try:
            return await _reduced(run, verdict, limit, twins)
        except NotReducible:
            pass  # a wrapper chooses some steps itself: every interleaving, as without the reduction
    found: Found[R] = Found()
    order = itertools.count()
    queue: list[tuple[int, int, list[int], list[list[str]]]] = [(0, next(order), [], [])]
    while queue and found.runs < limit:
        cost, _, prefix, expected = heapq.heappop(queue)
        if found.stopped_at is not None and cost > found.stopped_at:
            return found
        chooser = FewestFirst(prefix, expected)
        outcome = await run(chooser)
        found.runs += 1
        rank = verdict(outcome)
        if rank is not None:
            found.failing.append((cost, outcome))
            if rank == 0 and found.stopped_at is None:
                found.stopped_at = cost
        for depth in range(len(prefix), len(chooser.points)):
            point = chooser.points[depth]
            for index in range(len(point.options)):
                if index == chooser.taken[depth]:
                    continue
                extra = 1 if point.preemptible and index != point.default else 0
                child = [*chooser.taken[:depth], index]
                options = [p.options for p in chooser.points[: depth + 1]]
                heapq.heappush(queue, (cost + extra, next(order), child, options))
    found.complete = not queue
    return found


async def _reduced(
    run: Callable[[Chooser], Awaitable[R]], verdict: Callable[[R], int | None], limit: int,
    twins: Sequence[Sequence[str]],
) -> Found[R]:
    result = await explore_reduced(run, verdict, limit=limit, twins=twins)
    found: Found[R] = Found(runs=result.runs, complete=result.complete)
    found.failing = [(preemptions, outcome) for _, preemptions, outcome in result.failing]
    found.reduced = True
    return found
