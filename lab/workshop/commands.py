"""``lab exercise`` and ``lab check``: the workshop's two commands, and what they print.

``lab exercise N`` copies scenario N's buggy handler to ``workshop/<slug>.py`` for a participant to
fix. ``lab check N FILE`` puts that file through the grader (``lab.workshop.charge``) and prints either the
attacks it survived (exit 0) or the smallest failing run as a timeline, with the broken rule in
plain words (exit 1). A file that cannot be graded is one line and exit 2, as in Maelstrom, where a
checker's exit code says valid, invalid or unknown.
"""

from __future__ import annotations

import asyncio
import io
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from lab.engine.proxy import Unsupported
from lab.engine.reduction import explain
from lab.engine.timeline import timeline
from lab.errors import LabError
from lab.registry import ScenarioInfo
from lab.workshop.charge import ChargeGrader
from lab.workshop.grading import Budget, CannotGrade, Verdict
from lab.workshop.herd import grade_retry
from lab.workshop.submission import CONTRACTS, Submission, load
from lab.workshop.supervisor import Child, Message, Reporter

if TYPE_CHECKING:
    from lab.postgres.workspace import Workspace

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

    The grading runs in a child process the lab watches (``lab.workshop.supervisor``): nothing the file
    does can end the lab, hang it or pass for a verdict. The file is loaded, in that child, before any
    database is started, so a file that cannot be graded fails at once.
    """
    from lab.postgres.provision import held_signals, owned_temp_dir, remove_owned_dir, remove_stale_dirs

    file = Path(path) if path else default_file(info)
    stall = max(1.0, 3 * step_timeout)  # a turning event loop beats every 0.1 s; a frozen one, never
    remove_stale_dirs()  # those of a lab that was killed, hypothesis's directory included
    hypothesis_home: Path | None = None
    child: Child | None = None
    try:
        with held_signals():  # a Ctrl-C lands once the dir is named, so the finally removes it
            hypothesis_home = owned_temp_dir("hypothesis-")
        work = partial(_grade_in_child, _style_of(console), info, file, step_timeout, budget, hypothesis_home)
        child = Child.start(work, file)
        child.expect("loaded", stall=stall, doing="importing it")
        console.print(f"checking {file}: {info.contract} against scenario {info.number} ({info.title.lower()})")
        if info.contract == "call_with_retry":  # virtual time: no loop that could beat, so a budget in all
            child.go()
            verdict = child.expect("verdict", stall=15 * step_timeout, doing=info.contract)
        else:
            verdict = _on_postgres(console, child, stall, info.contract)
    finally:
        if child is not None:
            child.stop()
        if hypothesis_home is not None:
            remove_owned_dir(hypothesis_home)
    console.file.write(verdict["report"])
    console.file.flush()
    return int(verdict["code"])


def _on_postgres(console: Console, child: Child, stall: float, contract: str) -> Message:
    """Provision Postgres and the run's schemas here, in the lab: the child cannot take them down with it.

    In the main thread, too: the embedded server dies with the thread that started it.
    """
    from lab.postgres.provision import provision, run_held, verify  # deferred, as in `lab run`
    from lab.postgres.workspace import Workspace

    with provision() as pg:
        console.print(pg.description, style="dim", soft_wrap=True)
        opened: list[Workspace] = []

        async def open_schemas() -> None:
            await verify(pg)
            opened.append(await Workspace.open(pg.dsn))
            await opened[0].admin.close()  # the child grades on connections of its own

        try:
            run_held(open_schemas)  # a signal lands inside it or after it, never in the loop's making
            child.go(dsn=pg.dsn, schema=opened[0].schema)
            return child.expect("verdict", stall=stall, doing=contract, beats=True)
        finally:
            child.stop()  # first: its sessions may hold locks on the schemas
            for workspace in opened:
                run_held(workspace.close)


def _style_of(console: Console) -> dict[str, Any]:
    """What the child's console needs to render the report exactly as the lab's console would."""
    return {"width": console.width, "color_system": console.color_system, "force_terminal": console.is_terminal}


def _grade_in_child(style: dict[str, Any], info: ScenarioInfo, file: Path, step_timeout: float,
                    budget: Budget | None, hypothesis_home: Path, reporter: Reporter) -> None:
    """The child's side: load the file, wait for the database, grade, and send the rendered report."""
    from hypothesis.configuration import set_hypothesis_home_dir

    submission = load(file, info.contract)
    reporter.send("loaded")
    go = reporter.wait_go()
    set_hypothesis_home_dir(str(hypothesis_home))  # a check leaves nothing in the learner's folder
    if info.contract == "call_with_retry":
        verdict = grade_retry(submission)
    else:
        verdict = asyncio.run(_grade_on(go["dsn"], go["schema"], info, submission, step_timeout, budget, reporter))
    out = io.StringIO()
    code = finish(Console(file=out, highlight=False, **style), verdict)
    reporter.send("verdict", code=code, report=out.getvalue())


async def _grade_on(dsn: str, schema: str, info: ScenarioInfo, submission: Submission, step_timeout: float,
                    budget: Budget | None, reporter: Reporter) -> Verdict:
    import asyncpg

    from lab.postgres.workspace import Workspace

    beating = asyncio.create_task(reporter.heartbeat())
    try:
        admin = await asyncpg.connect(dsn, timeout=5)
        try:
            return await grade(Workspace(dsn, admin, schema), info, submission, step_timeout, budget)
        finally:
            admin.terminate()
    finally:
        beating.cancel()


async def grade(
    workspace: Workspace, info: ScenarioInfo, submission: Submission, step_timeout: float = 2.0,
    budget: Budget | None = None,
) -> Verdict:
    """The battery for a scenario whose handler talks to Postgres, chosen by the contract it implements."""
    try:
        return await _battery(workspace, info, submission, step_timeout, budget)
    except Unsupported as exc:  # an asyncpg call the lab refuses rather than run with other semantics
        line = submission.where(exc)
        raise CannotGrade(f"{submission.path}{', ' + line if line else ''}: {exc}") from exc


async def _battery(
    workspace: Workspace, info: ScenarioInfo, submission: Submission, step_timeout: float, budget: Budget | None
) -> Verdict:
    if info.contract == "handle_charge":
        if hasattr(info.module("buggy"), "CRASH"):  # a scenario with crash points: scenario 3
            from lab.workshop.charge_crash import LostTransitionGrader

            grader: ChargeGrader = LostTransitionGrader(
                workspace, info, submission, step_timeout=step_timeout, budget=budget
            )
            return await grader.grade()
        return await ChargeGrader(workspace, info, submission, step_timeout=step_timeout, budget=budget).grade()
    if info.contract == "handle_event":
        from lab.workshop.inbox import InboxGrader

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
    for line in explain(failure.outcome.trace) if failure.outcome is not None else ():
        console.print(Text(line))
    console.print()
    console.print("What it means:")
    for advice in failure.advice:
        console.print(Padding(Text(advice), (0, 0, 0, 2)))
