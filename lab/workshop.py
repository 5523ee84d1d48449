"""``lab exercise`` and ``lab check``: the workshop's two commands, and what they print.

``lab exercise N`` copies scenario N's buggy handler to ``workshop/<slug>.py`` for a participant to
fix. ``lab check N FILE`` puts that file through the grader (``lab.grader``) and prints either the
attacks it survived (exit 0) or the smallest failing run as a timeline, with the broken rule in
plain words (exit 1). A file that cannot be graded is one line and exit 2, as in Maelstrom, where a
checker's exit code says valid, invalid or unknown.
"""

from __future__ import annotations

import _thread
import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from lab.errors import LabError
from lab.grade_retry import grade_retry
from lab.grader import Budget, CannotGrade, ChargeGrader, Verdict
from lab.registry import ScenarioInfo
from lab.submission import CONTRACTS, Submission, load
from lab.timeline import timeline

if TYPE_CHECKING:
    from lab.workspace import Workspace

T = TypeVar("T")
EXIT_PASS, EXIT_FAIL = 0, 1
WORKSHOP_DIR = Path("workshop")


@dataclass(frozen=True)
class Exercise:
    goal: str
    watch: str  # the command that shows the bug first


EXERCISES: dict[int, Exercise] = {
    1: Exercise(
        "Two requests with one Idempotency-Key must charge the card once, whatever the interleaving; a\n"
        "retry after the first answered gets the same response, one in flight gets 409, and the same key\n"
        "with another body gets 422.",
        "lab run 1 --buggy",
    ),
    2: Exercise(
        "Clients that failed together must not retry together, a 4xx other than 429 must fail at once,\n"
        "and a retry must be the same request (one idempotency key for every attempt).",
        "lab run 2",
    ),
    3: Exercise(
        "A retry that finds the key in progress must not call the provider, and every state transition\n"
        "must check that it happened (a compare-and-set that looks at its row count).",
        "lab run 3 --buggy",
    ),
    4: Exercise(
        "An event delivered twice, concurrently or after a crash, must be applied exactly once: the\n"
        "business write only if the dedup insert returned a row, in the same transaction.",
        "lab run 4 --buggy",
    ),
}


def default_file(info: ScenarioInfo) -> Path:
    return WORKSHOP_DIR / f"{info.slug}.py"


def exercise(console: Console, info: ScenarioInfo, *, force: bool = False, directory: Path = WORKSHOP_DIR) -> int:
    """Copy the buggy handler for the participant to edit; never over their work without ``--force``."""
    source = Path(str(info.module("buggy").__file__))
    target = directory / f"{info.slug}.py"
    if target.exists() and not force:
        raise LabError(f"{target} exists already: edit it, or pass --force to start over from the buggy handler")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    about = EXERCISES.get(info.number)
    check = f"lab check {info.number} {target}"
    console.print(f"wrote {target}: the buggy {info.contract} of scenario {info.number} ({info.title.lower()})")
    console.print()
    console.print(Text(f"the bug:   {info.bug}"))
    if about:
        console.print(Text("your job:  " + about.goal.replace("\n", "\n           ")))
    console.print(Text(f"keep:      {CONTRACTS[info.contract][0]}"))
    console.print()
    if about:
        console.print(Text(f"watch the bug first:  {about.watch}"))
    console.print(Text(f"then edit the file and check it:  {check}   (or: make check-{info.number})"))
    return EXIT_PASS


def check(console: Console, info: ScenarioInfo, path: str | None, *, step_timeout: float = 2.0,
          budget: Budget | None = None) -> int:
    """Grade a participant's file against scenario ``info``: 0 pass, 1 fail; ``LabError`` when it cannot.

    The file is loaded before any database is started, so a file that cannot be graded fails at once.
    """
    file = Path(path) if path else default_file(info)
    submission = load(file, info.contract)
    console.print(f"checking {file}: {info.contract} against scenario {info.number} ({info.title.lower()})")
    with _hypothesis_home():
        verdict = _graded(console, info, submission, step_timeout, budget)
    return finish(console, verdict)


@contextmanager
def _hypothesis_home() -> Iterator[None]:
    """Hypothesis caches what it learns in ./.hypothesis; a check leaves nothing in the learner's folder."""
    from hypothesis.configuration import set_hypothesis_home_dir

    with tempfile.TemporaryDirectory(prefix="lab-hypothesis-") as home:
        set_hypothesis_home_dir(home)
        try:
            yield
        finally:
            set_hypothesis_home_dir(None)


def _graded(console: Console, info: ScenarioInfo, submission: Submission, step_timeout: float,
            budget: Budget | None) -> Verdict:
    if info.contract == "call_with_retry":
        verdict = _unstuck(lambda _alarm: grade_retry(submission), 15 * step_timeout, info.contract)
    else:
        def on_postgres(alarm: Alarm) -> Verdict:
            return _on_postgres(console, alarm, lambda ws: grade(ws, info, submission, step_timeout, budget))

        verdict = _unstuck(on_postgres, max(1.0, 3 * step_timeout), info.contract, armed=False)
    return verdict


async def grade(
    workspace: Workspace, info: ScenarioInfo, submission: Submission, step_timeout: float = 2.0,
    budget: Budget | None = None,
) -> Verdict:
    """The battery for a scenario whose handler talks to Postgres, chosen by the contract it implements."""
    if info.contract == "handle_charge":
        if hasattr(info.module("buggy"), "CRASH"):  # a scenario with crash points: scenario 3
            from lab.grade_lost import LostTransitionGrader

            grader: ChargeGrader = LostTransitionGrader(
                workspace, info, submission, step_timeout=step_timeout, budget=budget
            )
            return await grader.grade()
        return await ChargeGrader(workspace, info, submission, step_timeout=step_timeout, budget=budget).grade()
    if info.contract == "handle_event":
        from lab.grade_inbox import InboxGrader

        return await InboxGrader(workspace, info, submission, step_timeout=step_timeout, budget=budget).grade()
    raise LabError(f"scenario {info.number} ({info.slug}) has no grader yet")


def finish(console: Console, verdict: Verdict) -> int:
    """Print the verdict; the exit code it means."""
    report(console, verdict)
    return EXIT_FAIL if verdict.failure else EXIT_PASS


def report(console: Console, verdict: Verdict) -> None:
    """The attacks tried, then PASS, or FAIL with the smallest failing run and what it means."""
    console.print()
    width = max((len(a.name) for a in verdict.attacks), default=0)
    for attack in verdict.attacks:
        mark = "✗" if attack.failing else "✓"
        unit = attack.unit if attack.runs != 1 else attack.unit.removesuffix("s")
        failed = f", {attack.failing} failed" if attack.failing and attack.unit in ("runs", "trials") else ""
        console.print(Text(f"  {mark} {attack.name.ljust(width)}  {attack.runs} {unit}{failed}"))
    console.print()
    failure = verdict.failure
    if failure is None:
        console.print(Text(f"PASS: every attack held ({verdict.tried()}).", style="bold green"))
        return
    console.print(Text(f"FAIL: {failure.attack}: {failure.failing} of {failure.runs} {failure.unit} broke a rule.",
                       style="bold red"))
    if failure.outcome is not None:
        n = failure.preemptions
        title = "the simplest failing run"
        if n == 0:
            title += ": no preemption (each session ran until it finished, crashed or waited on a lock)"
        elif n is not None:
            title += f": {n} preemption{'' if n == 1 else 's'} (a session paused while it could have gone on)"
        console.print(timeline(failure.outcome.trace, failure.outcome.results, title=title))
    for problem in failure.problems:
        console.print(Text(f"✗ {problem}", style="bold red"))
    console.print()
    console.print("What it means:")
    for advice in failure.advice:
        console.print(Padding(Text(advice), (0, 0, 0, 2)))


def _on_postgres(console: Console, alarm: Alarm, grade: Callable[[Workspace], Awaitable[Verdict]]) -> Verdict:
    """Provision Postgres (in the main thread: the embedded server dies with the thread that started it)."""
    from lab.postgres import provision, verify  # deferred, as in `lab run`
    from lab.workspace import Workspace

    with provision() as pg:
        console.print(pg.description, style="dim", soft_wrap=True)

        async def graded() -> Verdict:
            beating = asyncio.create_task(alarm.heartbeat())
            try:
                await verify(pg)
                workspace = await Workspace.open(pg.dsn)
                try:
                    return await grade(workspace)
                finally:
                    await workspace.close()
            finally:
                beating.cancel()

        return asyncio.run(graded())


class Alarm:
    """Interrupts the main thread when the work stops giving control back, so a check never hangs.

    The scheduler's step timeout catches a handler that awaits forever; this catches one that never
    awaits (``while True: pass``, a long ``time.sleep``), which freezes the very event loop that
    timeout runs on. Armed, the work must :meth:`beat` every ``stall`` seconds (an event loop does it
    with :meth:`heartbeat`); work that cannot beat is armed from the start and has ``stall`` seconds in
    all. Two interrupts: asyncio's SIGINT handler turns the first into a cancellation of the main
    task, the second into a KeyboardInterrupt raised inside the stuck code.
    """

    def __init__(self, stall: float, *, armed: bool) -> None:
        self.stall = stall
        self.fired = False
        self._last = time.monotonic() if armed else None
        self._lock = threading.Lock()

    def beat(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    def disarm(self) -> None:
        with self._lock:
            self._last = None

    async def heartbeat(self) -> None:
        try:
            while True:
                self.beat()
                await asyncio.sleep(min(0.1, self.stall / 4))
        finally:
            self.disarm()

    def _stalled(self) -> bool:
        with self._lock:
            return self._last is not None and time.monotonic() - self._last >= self.stall

    def watch(self, done: threading.Event) -> None:
        while not done.wait(0.05):
            if self._stalled():
                self.fired = True
                _thread.interrupt_main()
                if not done.wait(0.5) and self._stalled():
                    _thread.interrupt_main()
                return


def _unstuck(work: Callable[[Alarm], T], stall: float, contract: str, *, armed: bool = True) -> T:
    alarm = Alarm(stall, armed=armed)
    done = threading.Event()
    watcher = threading.Thread(target=alarm.watch, args=(done,), name="lab-check-alarm", daemon=True)
    watcher.start()
    try:
        return work(alarm)
    except KeyboardInterrupt:
        if not alarm.fired:
            raise
        raise CannotGrade(
            f"{contract} did not give control back for {stall:g} s: a loop without await, or a blocking call"
            " such as time.sleep? Await the database, and use asyncio.sleep"
        ) from None
    finally:
        done.set()
        watcher.join()
