"""Every interleaving that can differ, once: Source-DPOR with sleep sets over the scheduler's choices.

Two runs that differ only in the order of independent steps (:mod:`lab.engine.conflicts`: different
sessions, nothing shared that one of them writes) end in the same state with the same answers, so
running one of them is enough. This is dynamic partial-order reduction as in Abdulla, Aronis, Jonsson
and Sagonas, "Optimal dynamic partial order reduction" (POPL 2014), Algorithm 1 (*Source-DPOR*) with
sleep sets (Godefroid, 1996), done stateless as the lab's other explorations are: each run replays a
prefix of choices from fresh state, then goes on; after it, every *race* in the run (two dependent
steps of different sessions with nothing ordering them in between) adds to the choice point just before
the first step a session that can start the reversed order (the race's *initials*), unless one is
already there. Sleep sets skip a session whose next step commutes with everything run since a sibling
explored it. Lock waits are part of the order: a step that waited can only go on after the step that
let it go (COMMIT, ROLLBACK), and the two always conflict (a lock is a write on its row).

Depth-first, not fewest preemptions first (:mod:`lab.engine.exploration`): sleep sets are sound for the
order the tree is walked in. The smallest failing run is found afterwards instead: every run of one
equivalence class has the same outcome, so for each failing class the linearisation with the fewest
preemptions (then switches) is computed from its happens-before order and replayed. It is the smallest
failing run of the full search, as before, but found after all classes rather than first.

The server decides which of several sessions waiting on one lock gets it first, so a replayed prefix can
come out otherwise: a run whose prefix diverged is replayed again, up to ``REPLAYS`` times.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lab.engine.conflicts import EVERYTHING, PROVIDER, Access, Footprint, describe
from lab.engine.scheduler import Choice, ScheduleError, Scheduler, running
from lab.engine.trace import Event, Trace

R = TypeVar("R")

#: How many times a run whose replayed prefix diverged (a lock's wake order) is tried again.
REPLAYS = 20


class Diverged(ScheduleError):
    """A replayed prefix met other sessions able to move, or other pending steps, than when it was recorded."""


class NotReducible(Exception):
    """The chooser is not asked every choice (a wrapper takes some itself, or hides sessions): the races it
    would read could not be placed, so the caller explores without the reduction."""


@dataclass
class _Node:
    options: list[str]  # the sessions that could move
    pending: dict[str, Footprint]  # what each one's next step may touch
    sleep: set[str]  # asleep on arrival: their next step was explored from an equivalent state
    backtrack: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    twins: dict[str, str] = field(default_factory=dict)  # an unmoved duplicate -> the one explored for it

    def todo(self) -> list[str]:
        left = self.backtrack - self.done - self.sleep - set(self.twins)
        return [name for name in self.options if name in left]


class Replay:
    """A chooser for one run: ``prefix`` replayed over recorded ``nodes``, then new choice points, recorded."""

    def __init__(
        self, prefix: Sequence[str], nodes: Sequence[_Node], twins: Sequence[Sequence[str]] = ()
    ) -> None:
        self.prefix = list(prefix)
        self.nodes = list(nodes)
        self._groups = {name: tuple(group) for group in twins for name in group}
        self.taken: list[str] = []
        self.asleep_at: int | None = None  # every session that could move was asleep: the rest is redundant
        self._last: str | None = None
        self._schedulers: list[Scheduler] = []

    def events(self) -> list[Event]:
        """The run's steps, from every scheduler that asked this chooser (each one a later round)."""
        if len(self._schedulers) == 1:
            return list(self._schedulers[0].trace.events)
        return [
            dataclasses.replace(e, round=index * 1_000_000 + e.round)
            for index, scheduler in enumerate(self._schedulers) for e in scheduler.trace.events
        ]

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        scheduler = running()
        if scheduler is None:
            raise ScheduleError("the reduction's chooser runs only under a scheduler")
        if scheduler not in self._schedulers:
            self._schedulers.append(scheduler)
        depth = len(self.taken)
        if sum(len(s.trace.events) for s in self._schedulers) != depth or list(runnable) != scheduler.runnable():
            raise NotReducible("a wrapper around the reduction's chooser takes or hides choices")
        choice: str
        if self.asleep_at is not None:
            choice = self._last if self._last is not None and self._last in runnable else runnable[0]
        elif depth < len(self.prefix):
            node = self.nodes[depth]
            pending = {name: scheduler.pending(name) for name in runnable}
            if node.options != list(runnable) or node.pending != pending:
                raise Diverged(
                    f"replay diverged at choice {depth}: expected {node.options}, got {list(runnable)} "
                    "(does the handler depend on something other than the database, like time or randomness?)"
                )
            choice = self.prefix[depth]
        else:
            pending = {name: scheduler.pending(name) for name in runnable}
            sleep = self._sleep_after(depth, pending)
            node = _Node(list(runnable), pending, sleep, twins=self._twins(runnable))
            awake = [name for name in runnable if name not in sleep and name not in node.twins]
            if not awake:
                self.asleep_at = depth
                choice = self._last if self._last is not None and self._last in runnable else runnable[0]
            else:
                choice = self._last if self._last is not None and self._last in awake else awake[0]  # no preemption
                node.backtrack.add(choice)
                node.done.add(choice)
                self.nodes.append(node)
        self.taken.append(choice)
        self._last = choice
        return choice

    def _twins(self, runnable: Sequence[str]) -> dict[str, str]:
        """Symmetry: of identical requests that have not moved yet, only the first is explored; a run in
        which another one goes first is the same run with the names swapped."""
        moved = set(self.taken)
        twins = {}
        for name in runnable:
            group = self._groups.get(name)
            if name in moved or not group:
                continue
            first = next(g for g in group if g in runnable and g not in moved)
            if first != name:
                twins[name] = first
        return twins

    def _sleep_after(self, depth: int, pending: dict[str, Footprint]) -> set[str]:
        if depth == 0:
            return set()
        parent = self.nodes[depth - 1]
        moved = self.taken[depth - 1]
        step = parent.pending[moved]
        return {
            name for name in (parent.sleep | parent.done) - {moved}
            if name in pending and name in parent.pending and not parent.pending[name].conflicts(step)
        }

    def preemptions(self) -> int:
        """Switches away from a session that could have gone on, as ``FewestFirst`` counts them."""
        count, last = 0, None
        for depth, name in enumerate(self.taken):
            if depth < len(self.nodes) and last in self.nodes[depth].options and name != last:
                count += 1
            last = name
        return count


class Follow:
    """Replays a whole schedule by session names (a linearisation); a session that cannot move is a divergence."""

    def __init__(self, order: Sequence[str]) -> None:
        self.order = list(order)
        self.taken = 0
        self._last: str | None = None
        self._preemptions = 0

    def choose(self, runnable: Sequence[str], blocked: Sequence[str]) -> Choice:
        if self.taken >= len(self.order) or self.order[self.taken] not in runnable:
            raise Diverged(f"replay diverged at step {self.taken}: {list(runnable)} can move")
        name = self.order[self.taken]
        if self._last in runnable and name != self._last:
            self._preemptions += 1
        self.taken += 1
        self._last = name
        return name

    def preemptions(self) -> int:
        return self._preemptions


# -- the order of one run: happens-before, races ------------------------------------------------------------


@dataclass
class Order:
    """One run's happens-before relation over its events, as bit sets: ``before[j]`` has bit i when i -> j."""

    events: list[Event]
    before: list[int]
    after: list[int]  # after[i] has bit j when i -> j
    dependent: list[int]  # dependent[j] has bit i (i < j) when the two steps conflict

    @classmethod
    def of(cls, events: Sequence[Event], upto: int | None = None) -> Order:
        events = list(events[: len(events) if upto is None else upto])
        n = len(events)
        before = [0] * n
        dependent = [0] * n
        last_of: dict[str, int] = {}
        woken_by: dict[str, int] = {}
        for j, e in enumerate(events):
            mask = 0
            if e.session in last_of:
                k = last_of[e.session]
                mask |= before[k] | 1 << k
            if e.session in woken_by:
                k = woken_by.pop(e.session)
                mask |= before[k] | 1 << k
            for i in range(j):
                other = events[i]
                if other.round < e.round:
                    mask |= before[i] | 1 << i
                elif other.session != e.session and other.footprint.conflicts(e.footprint):
                    dependent[j] |= 1 << i
                    mask |= before[i] | 1 << i
            before[j] = mask
            last_of[e.session] = j
            for name in e.woke:
                woken_by[name] = j
        after = [0] * n
        for j in range(n):
            m = before[j]
            while m:
                low = m & -m
                after[low.bit_length() - 1] |= 1 << j
                m ^= low
        return cls(events, before, after, dependent)

    def races(self) -> list[tuple[int, int]]:
        """Pairs (i, j): dependent steps of two sessions in one round, with no step ordered between them."""
        found = []
        for j in range(len(self.events)):
            m = self.dependent[j]
            while m:
                low = m & -m
                i = low.bit_length() - 1
                m ^= low
                between = self.before[j] & ((1 << j) - (1 << (i + 1)))
                if not between & self.after[i]:
                    found.append((i, j))
        return found

    def initials(self, i: int, j: int) -> set[str]:
        """Who can take the first step of the reversed race: the steps after i not ordered after it, then j."""
        v = [k for k in range(i + 1, j) if not self.after[i] >> k & 1] + [j]
        vmask = 0
        for k in v:
            vmask |= 1 << k
        return {self.events[k].session for k in v if not self.before[k] & vmask}

    def smallest(self) -> tuple[tuple[int, int], list[str]]:
        """The linearisation with the fewest preemptions, then switches, then sessions in name order.

        Dijkstra over (steps taken per session, who moved last); every path to a state has the same
        length, so comparing the orders themselves last keeps the labels monotone and the answer unique.
        """
        events = self.events
        sessions = sorted(dict.fromkeys(e.session for e in events), key=_by_name)
        steps = {s: [k for k, e in enumerate(events) if e.session == s] for s in sessions}
        waits = [0] * len(events)  # the step that woke a session, before its next step: it was not at a gate
        woken_by: dict[str, int] = {}
        for k, e in enumerate(events):
            if e.session in woken_by:
                waits[k] = 1 << woken_by.pop(e.session)
            for name in e.woke:
                woken_by[name] = k
        full = tuple(len(steps[s]) for s in sessions)
        Label = tuple[int, int, tuple[int, ...], tuple[int, ...], int, int]  # costs, order, counts, last, done
        heap: list[Label] = [(0, 0, (), tuple(0 for _ in sessions), -1, 0)]
        settled: set[tuple[tuple[int, ...], int]] = set()
        while heap:
            preempted, switched, order, counts, last, done = heapq.heappop(heap)
            if (counts, last) in settled:
                continue
            settled.add((counts, last))
            if counts == full:
                return (preempted, switched), [sessions[i] for i in order]
            at_gate = last >= 0 and counts[last] < full[last] and not waits[steps[sessions[last]][counts[last]]] & ~done
            for index, name in enumerate(sessions):
                if counts[index] == full[index]:
                    continue
                k = steps[name][counts[index]]
                if self.before[k] & ~done:
                    continue
                moved = (*counts[:index], counts[index] + 1, *counts[index + 1 :])
                if (moved, index) in settled:
                    continue
                heapq.heappush(heap, (
                    preempted + (at_gate and index != last), switched + (last >= 0 and index != last),
                    (*order, index), moved, index, done | 1 << k,
                ))
        raise AssertionError("a run's own order always has a linearisation")


def _by_name(session: str) -> tuple[int, str]:
    """T2 before T10: the number in a session's name, then the name."""
    number = re.search(r"\d+", session)
    return (int(number.group()) if number else 0, session)


# -- the exploration ------------------------------------------------------------------------------------------


@dataclass
class Reduced(Generic[R]):
    """What a reduced exploration ran: one run per class of equivalent interleavings, and the failing ones."""

    runs: int = 0
    failing: list[tuple[int, int, R]] = field(default_factory=list)  # (rank, preemptions, outcome) per class
    complete: bool = False
    replays: int = 0  # runs tried again because a replayed prefix diverged
    smallest: R | None = None  # the failing run of the worst rank with the fewest preemptions, replayed
    smallest_cost: tuple[int, int] | None = None  # its (preemptions, switches)


async def explore_reduced(
    run: Callable[[Replay | Follow], Awaitable[R]],
    verdict: Callable[[R], int | None],
    *,
    limit: int | None = None,
    observe: Callable[[R], None] | None = None,
    twins: Sequence[Sequence[str]] = (),
) -> Reduced[R]:
    """Run one interleaving per equivalence class, up to ``limit`` runs; then replay the smallest failing one.

    ``verdict`` ranks a failing run (0: the scenario's own invariant broke) or says None when it held.
    The races are read from the events of the schedulers that asked the chooser, whatever the run returns.
    ``twins``: groups of sessions sending identical requests; runs that differ only by swapping two of
    them are run once (symmetry reduction), so outcomes are met up to the names of identical sessions.
    """
    found: Reduced[R] = Reduced()
    prefix: list[str] = []
    nodes: list[_Node] = []
    candidates: list[tuple[int, Order, R]] = []
    while True:
        if limit is not None and found.runs >= limit:
            return await _finish(found, candidates, run, verdict, twins)
        chooser, outcome = await _run_replaying(run, prefix, nodes, found, twins)
        found.runs += 1
        if observe is not None:
            observe(outcome)
        events = chooser.events()
        order = Order.of(events, chooser.asleep_at)
        rank = verdict(outcome)
        if rank is not None:
            found.failing.append((rank, chooser.preemptions(), outcome))
            candidates.append((rank, Order.of(events), outcome))
        nodes = chooser.nodes
        for i, j in order.races():
            if i >= len(nodes) or order.events[i].round != order.events[j].round:
                continue
            node = nodes[i]
            starts = {node.twins.get(name, name) for name in order.initials(i, j) & set(node.options)}
            if not starts:
                node.backtrack |= set(node.options) - set(node.twins)  # not if the model holds: be exhaustive
            elif not starts & node.backtrack:
                mover = order.events[j].session
                node.backtrack.add(mover if mover in starts else min(starts))
        taken = chooser.taken
        for depth in range(len(nodes) - 1, -1, -1):
            node = nodes[depth]
            todo = node.todo()
            if todo:
                node.done.add(todo[0])
                prefix = [*taken[:depth], todo[0]]
                nodes = nodes[: depth + 1]
                break
        else:
            found.complete = True
            return await _finish(found, candidates, run, verdict, twins)


async def _run_replaying(
    run: Callable[[Replay | Follow], Awaitable[R]], prefix: list[str], nodes: list[_Node], found: Reduced[R],
    twins: Sequence[Sequence[str]],
) -> tuple[Replay, R]:
    for attempt in range(REPLAYS):
        chooser = Replay(prefix, nodes[: len(prefix)], twins)
        try:
            return chooser, await run(chooser)
        except Diverged:
            if attempt == REPLAYS - 1:
                raise
            found.replays += 1
    raise AssertionError("unreachable")


async def _finish(
    found: Reduced[R],
    candidates: list[tuple[int, Order, R]],
    run: Callable[[Replay | Follow], Awaitable[R]],
    verdict: Callable[[R], int | None],
    twins: Sequence[Sequence[str]],
) -> Reduced[R]:
    """Replay the simplest member of the simplest failing class: fewest preemptions, then switches; identical
    requests renamed so that the first of them to move is the first by name (T1), as without symmetry."""
    if not candidates:
        return found
    worst = min(rank for rank, _, _ in candidates)
    ranked = [(order.smallest(), outcome) for rank, order, outcome in candidates if rank == worst]
    (cost, schedule), outcome = min(ranked, key=lambda item: item[0][0])
    found.smallest, found.smallest_cost = outcome, cost
    renamed: dict[str, str] = {}
    for group in twins:
        movers = [name for name in dict.fromkeys(schedule) if name in group]
        renamed.update(zip(movers, sorted(group, key=_by_name), strict=False))
    schedule = [renamed.get(name, name) for name in schedule]
    for _ in range(REPLAYS):
        follow = Follow(schedule)
        try:
            replayed = await run(follow)
        except Diverged:
            continue
        if verdict(replayed) == worst:  # the same class, so the same outcome: it is the one to show
            found.smallest = replayed
            found.failing = [
                (r, follow.preemptions(), replayed) if o is outcome else (r, p, o) for r, p, o in found.failing
            ]
        break
    return found


# -- the why: which conflict a failing run turned on -----------------------------------------------------------


def explain(trace: Trace) -> list[str]:
    """One or two lines naming the conflict a run turned on, read from its events and the conflict relation.

    A stale read first: a session's read of a row that another session then wrote where others see it
    (autocommit, or its COMMIT), the earliest such write and the last read before it. Else the first
    race between sessions on a row (two writes). Said as who did what to which rows, in what order;
    then the effect that two or more sessions went on to write, if any (the provider's ledger, most
    often). Empty when neither is found.
    """
    events = trace.events
    if not events:
        return []
    stale: list[tuple[int, int, int, Access, Access]] = []
    for j, later in enumerate(events):
        for i in range(j):
            earlier = events[i]
            if earlier.session == later.session or earlier.round != later.round:
                continue
            pair = earlier.footprint.conflict(later.footprint)
            if pair is not None and _named(*pair) and not pair[0].write and pair[1].write and not pair[1].hidden:
                stale.append((j, -i, i, *pair))
    lines = []
    if stale:
        j, _, i, a, b = min(stale, key=lambda s: (s[0], s[1]))
        lines.append(_race_line(trace, i, j, a, b))
    else:
        for i, j in Order.of(events).races():
            pair = events[i].footprint.conflict(events[j].footprint)
            if pair is not None and _named(*pair):
                lines.append(_race_line(trace, i, j, *pair))
                break
    effect = _effect(events, trace)
    if effect:
        lines.append(f"     then {effect}" if lines else f"why: {effect}")
    return lines


def _named(a: Access, b: Access) -> bool:
    """A conflict on rows a reader can be told about: not 'everything', not the provider's ledger."""
    return EVERYTHING not in (a.resource, b.resource) and PROVIDER not in (a.resource, b.resource)


def _step_name(trace: Trace, event: Event) -> str:
    verb = event.footprint.verb
    return f"{event.session}'s {verb}"


def _race_line(trace: Trace, i: int, j: int, a: Access, b: Access) -> str:
    first, second = trace.events[i], trace.events[j]
    kind = f"{'write' if a.write else 'read'}, then {'write' if b.write else 'read'}"
    rows = describe(a if a.pins else b)
    where = "one row" if (a.pins or b.pins) else "one table"
    if first.footprint.verb in _ENDS:
        wrote = _written_by(trace, i, b)
        what = f"{wrote.footprint.verb} of {rows}" if wrote is not None else f"write of {rows}"
        return (f"why: {first.session}'s {what} {_ENDS[first.footprint.verb]} before {second.session}'s"
                f" {second.footprint.verb} of it ({kind}, on {where})")
    if second.footprint.verb in _ENDS:
        wrote = _written_by(trace, j, a)
        what = f"{wrote.footprint.verb} of it" if wrote is not None else "write"
        return (f"why: {_step_name(trace, first)} of {rows} ran before {second.session}'s {what}"
                f" {_ENDS[second.footprint.verb]} ({kind}, on {where})")
    return f"why: {_step_name(trace, first)} of {rows} ran before {second.session}'s {second.footprint.verb} of it" \
           f" ({kind}, on {where})"


_ENDS = {"COMMIT": "committed", "ROLLBACK": "rolled back"}


def _written_by(trace: Trace, end: int, other: Access) -> Event | None:
    """The step of the transaction ended at ``end`` that wrote the rows ``other`` touches: what to name."""
    session = trace.events[end].session
    for e in reversed(trace.events[:end]):
        if e.session != session:
            continue
        if e.footprint.verb in ("BEGIN", *_ENDS):
            return None
        if any(acc.write and Access(acc.resource, acc.pins, True).meets(other) for acc in e.footprint.accesses):
            return e
    return None


def _touched_none(trace: Trace, event: Event) -> bool:
    """The step's own result says it wrote no row ("INSERT 0 0", "UPDATE 0"): not an effect, whatever it might have."""
    if event.row is None:
        return False
    result = trace.rows[event.row].result
    if result is None and event.blocked:  # the result is on its "<... completed>" row
        later = [r for r in trace.rows[event.row + 1 :] if r.session == event.session and r.text.startswith("<...")]
        result = later[0].result if later else None
    return result is not None and re.fullmatch(r"(INSERT \d+|UPDATE|DELETE) 0|\(no row\)|\[\]", result) is not None


def _effect(events: Sequence[Event], trace: Trace) -> str:
    """What two or more sessions then each wrote: the effect the race let through twice."""
    writers: dict[tuple[str, tuple[tuple[str, str], ...]], list[str]] = {}
    verbs: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
    for e in events:
        if e.footprint.verb not in ("INSERT", "UPDATE", "DELETE", "provider.charge") or _touched_none(trace, e):
            continue
        for access in e.footprint.accesses:
            if access.write and access.resource != EVERYTHING:
                key = (access.resource, access.pins)
                writers.setdefault(key, [])
                if e.session not in writers[key]:
                    writers[key].append(e.session)
                verbs.setdefault(key, e.footprint.verb)
    shared = [(key, who) for key, who in writers.items() if len(who) > 1]
    if not shared:
        return ""
    provider = [s for s in shared if s[0][0] == PROVIDER]
    key, who = (provider or sorted(shared, key=lambda s: (not s[0][1], len(s[0][1]))))[0]
    who = sorted(who)
    names = ", ".join(who[:-1]) + f" and {who[-1]}"
    if key[0] == PROVIDER:
        return f"{names} each called provider.charge"
    return f"{names} each wrote {describe(Access(key[0], key[1], True))} ({verbs[key]})"
