"""Schedules: who takes the next step. Written by hand (a scenario's canonical race) or enumerated.

Exploration is stateless depth-first search over the scheduler's choices, replaying from fresh state
each time, as a model checker without state hashing does: isolationtester enumerates every
permutation of fixed steps, but our handlers choose their next statement from what they read, so the
tree of choices is only known by running it.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from lab.engine.scheduler import Choice, Crash, ScheduleError


@dataclass(frozen=True)
class Schedule:
    """An annotated list of turns, like a Hermitage script: ``("T2", "INSERT fails, error ignored")``.

    ``strict`` replays it exactly and fails loudly on a turn that cannot be taken. A fix or a
    learner's handler takes other steps than the buggy one, so it replays the same schedule
    *leniently*: turns naming a session that cannot move are skipped, and once the script is
    exhausted the sessions finish in name order.
    """

    turns: tuple[tuple[Choice, str], ...]

    @classmethod
    def of(cls, *turns: tuple[str, str]) -> Schedule:
        parsed: list[tuple[Choice, str]] = []
        for who, note in turns:
            parsed.append((Crash(who.removesuffix("!")) if who.endswith("!") else who, note))
        return cls(tuple(parsed))

    def chooser(self, *, strict: bool) -> ScriptedChooser:
        return ScriptedChooser([who for who, _ in self.turns], strict=strict)


class ScriptedChooser:
    """Plays a list of turns; in strict mode a turn that cannot be taken is a :class:`ScheduleError`."""

    def __init__(self, turns: Sequence[Choice], *, strict: bool) -> None:
        self._turns = list(turns)
        self._strict = strict
        self._position = 0

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        while self._position < len(self._turns):
            turn = self._turns[self._position]
            self._position += 1
            name = turn.session if isinstance(turn, Crash) else turn
            if self._strict or name in runnable or (isinstance(turn, Crash) and name in blocked):
                return turn
        if self._strict:
            raise ScheduleError(
                f"schedule ended after {len(self._turns)} turns, but {', '.join(runnable)} still had steps to take"
            )
        return runnable[0]


@dataclass
class DepthFirst:
    """Chooses along a prefix of choice indices, then the first runnable session; remembers the options.

    Only real choices (two or more sessions able to move) are recorded, so the count of runs is the
    count of distinct interleavings.
    """

    prefix: list[int] = field(default_factory=list)
    options: list[list[str]] = field(default_factory=list)
    taken: list[int] = field(default_factory=list)

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        if len(runnable) == 1:
            return runnable[0]
        depth = len(self.taken)
        index = self.prefix[depth] if depth < len(self.prefix) else 0
        if depth < len(self.prefix) and depth < len(self.options) and self.options[depth] != list(runnable):
            raise ScheduleError(
                f"replay diverged at choice {depth}: expected {self.options[depth]}, got {list(runnable)} "
                "(does the handler depend on something other than the database, like time or randomness?)"
            )
        if index >= len(runnable):
            raise ScheduleError(f"replay diverged at choice {depth}: only {len(runnable)} sessions can move")
        if depth >= len(self.options):
            self.options.append(list(runnable))
        self.taken.append(index)
        return runnable[index]

    def next(self) -> DepthFirst | None:
        """The next unexplored branch, backtracking from the deepest choice; None when all are done."""
        for depth in range(len(self.taken) - 1, -1, -1):
            if self.taken[depth] + 1 < len(self.options[depth]):
                prefix = [*self.taken[:depth], self.taken[depth] + 1]
                return DepthFirst(prefix=prefix, options=[list(o) for o in self.options[: depth + 1]])
        return None


class RandomWalk:
    """One random path down the tree of choices that :class:`DepthFirst` walks, and its weight.

    Knuth's estimator (D. E. Knuth, "Estimating the efficiency of backtrack programs", Mathematics of
    Computation 29, 1975): choose uniformly at every real choice and multiply the numbers of options
    met; the product's mean over many walks is the number of leaves, here the runs a depth-first
    exploration makes. Cheap (a walk is one run) and unbiased, but only an estimate: handlers that
    branch on what they read give some paths far more leaves than others.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.weight = 1

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        if len(runnable) > 1:  # as DepthFirst: only a real choice branches the tree
            self.weight *= len(runnable)
        return self._rng.choice(list(runnable))


async def estimate_runs(run: Callable[[RandomWalk], Awaitable[object]], walks: int = 16, seed: int = 0) -> int:
    """About how many runs a depth-first exploration of ``run`` makes: the mean weight of ``walks`` random walks."""
    rng = random.Random(seed)
    total = 0
    for _ in range(walks):
        walk = RandomWalk(rng)
        await run(walk)
        total += walk.weight
    return max(1, round(total / walks))
