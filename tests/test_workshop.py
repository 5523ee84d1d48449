"""The workshop: `lab exercise` hands out the bug, `lab check` grades a fix and cannot be fooled.

The grader is only as good as the wrong fixes it rejects, so every file in ``tests/wrong_fixes`` (a
plausible fix that is wrong, with why in its docstring) must fail with a timeline of the failing
interleaving, and every file in ``tests/right_fixes`` (another correct design than ours) must pass.
"""

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from lab.attacks.retry_rules import check_retry
from lab.errors import LabError
from lab.postgres.provision import Postgres
from lab.postgres.workspace import Workspace
from lab.registry import scenario
from lab.workshop.commands import finish, grade
from lab.workshop.grading import Budget, CannotGrade
from lab.workshop.herd import grade_retry
from lab.workshop.submission import load

ROOT = Path(__file__).resolve().parent.parent
WRONG = ROOT / "tests" / "wrong_fixes"
RIGHT = ROOT / "tests" / "right_fixes"
LAB = [sys.executable, "-m", "lab.cli"]

# What each wrong fix must be caught doing, and the rule the verdict names (the line the participant is shown).
CAUGHT = {
    "s1_lock_that_locks_nothing": ("key k1 charged 2 times", "one charge per key"),
    "s1_check_in_the_wrong_transaction": ("key k1 charged 2 times", "one charge per key"),
    "s1_ignored_on_conflict_result": ("key k1 charged 2 times", "one charge per key"),
    "s1_advisory_lock_released_early": ("key k1 charged 2 times", "one charge per key"),
    "s1_transaction_read_committed": ("key k1 charged 2 times", "one charge per key"),
    "s1_in_memory_lock": ("key k1 charged 2 times", "one charge per key"),
    "s1_on_conflict_do_update": ("key k1 charged 2 times", "one charge per key"),
    "s1_replays_in_progress_as_success": ('T2 answered 200 {"status": "in_progress"}',
                                          "a duplicate in flight gets 409"),
    "s1_in_flight_answers_202": ('T2 answered 202 {"status": "accepted, in progress"}',
                                 "a duplicate in flight gets 409"),
    "s1_forgets_the_body": ("reused key k1 with a different body", "another body with the same key gets 422"),
    "s1_fingerprints_the_amount": ("reused key k1 with a different body and got 201",
                                   "another body with the same key gets 422"),
    "s1_replays_by_body": ("(key k2) was answered charge ch_1, which was made for key k1", "keys are independent"),
    "s1_unique_violation_escapes": ("T2 raised UniqueViolationError", "every request is answered"),
    "s1_serializable_without_retry": ("raised SerializationError", "every request is answered"),
    "s1_advisory_lock_on_the_pool": ("key k1 charged 2 times", "one charge per key"),
    "s2_jitter_too_small": ("clients arrived in one 50 ms bucket",
                            "clients that failed together do not retry together"),
    "s2_retry_condition_too_wide": ("a 402 was sent 6 times", "a 4xx other than 429 is final"),
    "s2_retries_4xx": ("a 400 was sent 6 times", "a 4xx other than 429 is final"),
    "s2_new_key_per_attempt": ("was charged 2 times for one client", "a retry is the same request"),
    "s2_ignores_retry_after": ("a 429 asked for 3 s (ProviderError.retry_after), but the retry came after",
                               "Retry-After is waited out"),
    "s2_retry_after_only_on_429": ("a 503 asked for 3 s (ProviderError.retry_after), but the retry came after",
                                   "Retry-After is waited out"),
    "s2_retries_gateway_errors_only": ("after 500-501, 505-599 once, then 200, the caller got the error",
                                       "a 5xx and a timeout are retried"),
    "s2_ignores_max_attempts": ("with max_attempts=3 and a provider that always answers 503, fn was called 6 times",
                                "max_attempts is the number of calls"),
    "s2_swallows_cancellation": ("the caller's deadline cancelled the call at 0.03 s, but 5 attempts followed",
                                 "cancellation goes through at once"),
    "s3_409_without_lease": ("key k1 ended in_progress, not completed", "Retry-After is a promise"),
    "s3_polls_every_second": ("(1 s the last time), and was still told 409", "Retry-After is a promise"),
    "s3_lease_on_the_database_clock": ("(30 s the last time), and was still told 409", "lab.clock.now()"),
    "s3_takeover_without_provider_key": ("key k1 charged 2 times (ch_1, ch_2)", "the client's retry finishes the job"),
    "s3_cas_but_charges_in_progress": ("key k1 charged 2 times", "one provider call per key while its owner holds it"),
    "s3_failed_is_final": ("key k1 ended failed, not completed", "the client's retry finishes the job"),
    "s3_no_fencing": ("was marked failed while its charge (ch_1) went through", "the client's retry finishes the job"),
    "s3_takeover_decided_in_python": ("T2 and T3 both took failed key k1 over", "one retry takes a key over"),
    "s3_takeover_ignores_the_body": ("T2 reused key k1 with another body, answered 201",
                                     "another body with the same key gets 422"),
    "s4_two_transactions": ("event e1 lost (sku-01 reserved 0, expected 5)", "no event is lost"),
    "s4_check_then_apply": ("event e1 applied 2 times", "each event is applied exactly once"),
    "s4_guarded_update": ("event e1 applied 2 times", "each event is applied exactly once"),
    "s4_record_after_apply": ("event e1 applied 2 times", "each event is applied exactly once"),
    "s4_seen_in_memory": ("event e1 applied 2 times", "each event is applied exactly once"),
    "s4_read_modify_write": ("sku-01 reserved 3, expected 8: 5 lost", "no event is lost"),
    "s4_happy_path_only": ("malformed event 'bad-zero' (sku-01, qty 0) accepted", "an event that can never apply is"
                                                                                   " rejected"),
    "s4_accepts_a_zero_quantity": ("malformed event 'bad-zero' (sku-01, qty 0) accepted",
                                   "an event that can never apply is rejected"),
    "s4_savepoint_swallows_the_duplicate": ("event e1 applied 2 times", "each event is applied exactly once"),
    "s4_begin_on_the_pool": ("event e1 lost", "no event is lost"),
    "s4_skips_unknown_skus": ("malformed event 'bad-sku' (sku-unknown, qty 4) accepted",
                              "an event that can never apply is rejected"),
}


def assert_caught(path: Path, output: str) -> None:
    """The verdict shows what the wrong fix did, and names the rule it breaks."""
    did, rule = CAUGHT[path.stem]
    assert did in output, output
    assert rule in output.replace("\n", " "), output


def files(folder: Path, prefix: str) -> list[Path]:
    return sorted(folder.glob(f"{prefix}_*.py"))


def recording() -> Console:
    return Console(width=120, color_system=None, force_terminal=False, record=True, file=open(os.devnull, "w"))


async def check_file(workspace: Workspace, path: Path, budget: Budget | None = None) -> tuple[int, str]:
    """What `lab check 1 FILE` does after provisioning: grade, print, and the exit code; with its output."""
    console = recording()
    verdict = await grade(workspace, scenario(1), load(path, "handle_charge"), 2.0, budget)
    code = finish(console, verdict)
    return code, console.export_text()


def lab(*args: str, dsn: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LAB_DATABASE_URL": dsn, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*LAB, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False)


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


# -- lab exercise ----------------------------------------------------------------------------------------


def test_exercise_copies_the_buggy_handler_and_says_what_to_do(tmp_path: Path) -> None:
    """`lab exercise 1` writes workshop/s1_dedup_race.py, byte for byte the buggy handler, and names the check."""
    done = subprocess.run([*LAB, "exercise", "1"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    copy = tmp_path / "workshop" / "s1_dedup_race.py"
    assert copy.read_bytes() == (ROOT / "scenarios" / "s1_dedup_race.py").read_bytes()
    assert "lab check 1 workshop/s1_dedup_race.py" in done.stdout
    assert "make check-1" in done.stdout


def test_exercise_never_overwrites_work_without_force(tmp_path: Path) -> None:
    """A second `lab exercise 1` refuses in one line with exit 2; with --force it starts over."""
    copy = tmp_path / "workshop" / "s1_dedup_race.py"
    copy.parent.mkdir()
    copy.write_text("# my work\n")
    refused = subprocess.run([*LAB, "exercise", "1"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--force" in refused.stderr
    assert copy.read_text() == "# my work\n"
    forced = subprocess.run([*LAB, "exercise", "1", "--force"], capture_output=True, text=True, cwd=tmp_path,
                            check=False)
    assert forced.returncode == 0
    assert copy.read_bytes() == (ROOT / "scenarios" / "s1_dedup_race.py").read_bytes()


def test_make_check_runs_lab_check_on_the_default_or_the_given_file() -> None:
    """`make check-1` runs `lab check 1` (whose default file is the exercise's), and FILE=... is passed on."""
    make = ["make", "-n", "--no-print-directory"]  # under `make test` a nested make would name its directory
    default = subprocess.run([*make, "check-1"], capture_output=True, text=True, cwd=ROOT, check=True)
    given = subprocess.run([*make, "check-1", "FILE=mine.py"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert default.stdout.strip().splitlines()[-1].strip() == ".venv/bin/lab check 1"
    assert given.stdout.strip().splitlines()[-1] == ".venv/bin/lab check 1 mine.py"


# -- lab check: the exit codes a participant meets -------------------------------------------------------


BROKEN_FILES = {
    "syntax.py": ("async def handle_charge(db, provider, key, body)\n    pass\n", "line 1: does not compile"),
    "imports.py": ("import no_such_module_anywhere\n", "importing it failed: ModuleNotFoundError"),
    "missing.py": ("async def handle(db, provider, key, body): ...\n", "defines no handle_charge"),
    "plain.py": ("def handle_charge(db, provider, key, body): ...\n", "must be `async def handle_charge"),
    "arity.py": ("async def handle_charge(db, key, body): ...\n", "cannot be called as `async def handle_charge"),
}


@pytest.mark.parametrize("name", BROKEN_FILES)
def test_a_file_that_cannot_be_loaded_is_one_line(tmp_path: Path, name: str) -> None:
    """A file that does not compile or import, lacks the function, or has the wrong signature: one LabError line."""
    source, expected = BROKEN_FILES[name]
    with pytest.raises(LabError) as raised:
        load(write(tmp_path, name, source), "handle_charge")
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)


def test_cli_says_a_broken_file_in_one_line_with_exit_2_before_starting_postgres(tmp_path: Path) -> None:
    """`lab check` on a file with a syntax error exits 2 with one line naming the line, and no traceback."""
    path = write(tmp_path, "mine.py", "async def handle_charge(db, provider, key, body)\n    pass\n")
    done = lab("check", "1", str(path), dsn="postgresql://nobody@127.0.0.1:1/none")  # never reached
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "line 1: does not compile" in done.stderr
    assert "Traceback" not in done.stderr


RAISES_ALONE = '''
import lab

async def handle_charge(db, provider, key, body):
    await db.fetchrow("SELECT 1")
    return lab.Response(201, {"amount": body["amount"]})
'''

HANGS = '''
import asyncio

async def handle_charge(db, provider, key, body):
    await db.fetchrow("SELECT 1")
    await asyncio.Event().wait()
'''

NEVER_STOPS = '''
async def handle_charge(db, provider, key, body):
    while True:
        await db.fetchval("SELECT 1")
'''


async def test_a_handler_that_raises_on_a_lone_request_cannot_be_graded(tmp_path: Path, workspace: Workspace) -> None:
    """Raising with nothing racing (so in every run) is one line naming the exception and the file's line."""
    path = write(tmp_path, "raises.py", RAISES_ALONE)
    with pytest.raises(CannotGrade) as raised:
        await grade(workspace, scenario(1), load(path, "handle_charge"))
    message = str(raised.value)
    assert "raises.py, line 6: handle_charge raised TypeError" in message
    assert "on a single request with nothing racing it" in message


async def test_a_handler_that_hangs_is_stopped_by_the_step_timeout(tmp_path: Path, workspace: Workspace) -> None:
    """A handler awaiting something that never comes is stopped after the step timeout, in one line."""
    path = write(tmp_path, "hangs.py", HANGS)
    started = time.monotonic()
    with pytest.raises(CannotGrade) as raised:
        await grade(workspace, scenario(1), load(path, "handle_charge"), 0.3)
    assert time.monotonic() - started < 5
    assert "T1 made no progress for 0.3 s" in str(raised.value)


async def test_a_handler_that_never_stops_stepping_is_stopped(tmp_path: Path, workspace: Workspace) -> None:
    """A run longer than the step budget (a loop of statements) cannot end under a schedule: one line."""
    path = write(tmp_path, "loops.py", NEVER_STOPS)
    with pytest.raises(CannotGrade) as raised:
        await grade(workspace, scenario(1), load(path, "handle_charge"), budget=Budget(max_steps=50))
    assert "one run took more than 50 steps" in str(raised.value)


def test_a_handler_that_never_yields_the_event_loop_is_stopped(tmp_path: Path, postgres: Postgres) -> None:
    """`while True: pass` freezes the loop the step timeout runs on; the alarm still ends the check: exit 2."""
    path = write(tmp_path, "spins.py", "async def handle_charge(db, provider, key, body):\n    while True:\n"
                                       "        pass\n")
    started = time.monotonic()
    done = lab("check", "1", str(path), "--step-timeout", "0.3", dsn=postgres.dsn, timeout=30)
    assert time.monotonic() - started < 15
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "did not give control back for 1 s" in done.stderr


# -- a file that tries to end, hang or fool the grader -----------------------------------------------------

BUGGY_1 = (ROOT / "scenarios" / "s1_dedup_race.py").read_text()

# A file, and what `lab check 1` must say about it: exit 2 and one line, never exit 0.
HOSTILE = {
    "exits_at_import": ("import sys\nsys.exit(0)\n", "line 2: it called sys.exit(0)"),
    "raises_systemexit": ("async def handle_charge(db, provider, key, body):\n    raise SystemExit\n",
                          "line 2: it called sys.exit(None)"),
    "os_exit_at_import": ("import os\nos._exit(0)\n", "line 2: it called os._exit(0)"),
    "os_exit_in_handler": ("import os\nasync def handle_charge(db, provider, key, body):\n    os._exit(0)\n",
                           "line 3: it called os._exit(0)"),
    "sleeps_at_import": ("import time\ntime.sleep(3600)\n", "line 2: importing it did not finish within 1.5 s"
                         " (at `time.sleep(3600)`)"),
    "sleeps_catching_everything": (
        "import time\nasync def handle_charge(db, provider, key, body):\n    while True:\n        try:\n"
        "            time.sleep(3600)\n        except BaseException:\n            pass\n",
        "line 5: handle_charge did not give control back for 1.5 s (at `time.sleep(3600)`)",
    ),
    "kills_its_process_group": (
        "import os, signal\nasync def handle_charge(db, provider, key, body):\n    os.killpg(0, signal.SIGKILL)\n",
        "the grader's process was killed by SIGKILL before giving a verdict",
    ),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_file_cannot_end_or_hang_the_grader(tmp_path: Path, postgres: Postgres, name: str) -> None:
    """Exiting, killing its process group or blocking, at import or in the handler: exit 2, one line naming it."""
    source, expected = HOSTILE[name]
    path = write(tmp_path, f"{name}.py", source)
    started = time.monotonic()
    done = lab("check", "1", str(path), "--step-timeout", "0.5", dsn=postgres.dsn, timeout=60)
    assert time.monotonic() - started < 15  # the stall (1.5 s) and start-up, never the hour it asked for
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"{path}, {expected}" in done.stderr or expected in done.stderr, done.stderr


def test_a_file_that_closes_stdout_and_forks_is_still_graded(tmp_path: Path, postgres: Postgres) -> None:
    """The buggy handler, sending stdout to /dev/null and forking a process that exits 0: FAIL, exit 1, report intact.

    (Every request imports the file afresh, so this runs for each one.)
    """
    path = write(tmp_path, "sly.py", "import os, sys\nos.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n"
                                     "sys.stdout.close()\nif os.fork() == 0:\n    os._exit(0)\n" + BUGGY_1)
    done = lab("check", "1", str(path), dsn=postgres.dsn)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL: " in done.stdout and "key k1 charged 2 times" in done.stdout


# A grandchild in a session of its own whose parent has exited: the hardest process for a grader to find.
# The file starts one (once: every request imports the file afresh) and records its pid.
SPAWNS_A_SLEEPER = """import os, subprocess, sys
INTERMEDIATE = (
    "import subprocess, sys\\n"
    "sleeper = subprocess.Popen([sys.executable, '-c',"
    " 'import os, time; print(os.getpid(), flush=True); time.sleep(600)'],"
    " start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)\\n"
    "print(sleeper.stdout.readline().strip(), flush=True)\\n"
)
def spawn_a_sleeper_once(record):
    if not os.path.exists(record):
        started = subprocess.run([sys.executable, "-c", INTERMEDIATE], capture_output=True, text=True, check=True)
        with open(record, "a") as pids:
            pids.write(started.stdout)
"""

# How the grading ends, and the exit code: the verdict (the child exits by itself), the file's os._exit, a stall.
LEFT_BEHIND = {
    "graded": ("spawn_a_sleeper_once(RECORD)\n" + BUGGY_1, 1),
    "os_exit": ("async def handle_charge(db, provider, key, body):\n    spawn_a_sleeper_once(RECORD)\n"
                "    os._exit(0)\n", 2),
    "stalls": ("import time\nasync def handle_charge(db, provider, key, body):\n    spawn_a_sleeper_once(RECORD)\n"
               "    time.sleep(3600)\n", 2),
}


@pytest.mark.parametrize("ending", LEFT_BEHIND)
def test_nothing_the_file_started_outlives_the_check(tmp_path: Path, postgres: Postgres, ending: str) -> None:
    """A process the file started in a session of its own, orphaned at once, is gone when `lab check` ends,
    however the grading ended: the grader is a subreaper, and its descendants are killed before it."""
    record = tmp_path / "sleepers"
    source, code = LEFT_BEHIND[ending]
    path = write(tmp_path, f"{ending}.py", SPAWNS_A_SLEEPER + f"RECORD = {str(record)!r}\n" + source)
    try:
        done = lab("check", "1", str(path), "--step-timeout", "0.5", dsn=postgres.dsn, timeout=60)
        assert done.returncode == code, done.stdout + done.stderr
        sleepers = [int(pid) for pid in record.read_text().split()]
        assert len(sleepers) == 1
        assert [pid for pid in sleepers if _running(pid)] == []
    finally:
        for pid in record.read_text().split() if record.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_check_leaves_nothing_the_next_lab_does_not_reap(tmp_path: Path) -> None:
    """SIGKILL mid-check leaves hypothesis's directory behind; the next lab's start-up removes it."""
    path = write(tmp_path, "slow.py", "import time\nasync def call_with_retry(fn, max_attempts=6):\n"
                                      "    time.sleep(3600)\n")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*LAB, "check", "2", str(path)], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("checking "), proc.communicate()
        deadline = time.monotonic() + 10
        while not [d.name for d in temp.iterdir() if "hypothesis" in d.name]:
            assert time.monotonic() < deadline, "the check made no directory for hypothesis"
            time.sleep(0.01)
        proc.kill()
        proc.wait(10)
    finally:
        proc.kill()
    subprocess.run([*LAB, "check", "2", str(tmp_path / "none.py")], env=env, capture_output=True, check=False)
    assert [d.name for d in temp.iterdir() if "hypothesis" in d.name] == []


# -- the grader that cannot be fooled: scenario 1 ----------------------------------------------------------


@pytest.mark.parametrize("path", files(WRONG, "s1"), ids=lambda p: p.stem)
async def test_every_wrong_fix_is_rejected_with_its_failing_interleaving(path: Path, workspace: Workspace) -> None:
    """A plausible wrong fix exits 1, and the output shows the failing run as a timeline and the broken rule."""
    code, output = await check_file(workspace, path)
    assert code == 1, output
    assert "the simplest failing run" in output
    assert_caught(path, output)


# Lock-based designs make hundreds of interleavings, each slowed by lock waits, so the suite grades the
# right designs on a much smaller budget than the CLI's (past each limit, random schedules take over, and
# fewer of them): every attack still runs, each on its simplest interleavings. `make mutants` grades
# every right design (and every wrong one) with `lab check` itself, on the CLI's full budget.
SUITE_BUDGET = Budget(pairs_limit=60, other_body_limit=20, keys_limit=10, race_limit=6, stall_limit=20,
                      triples_limit=20, random_examples=8, stress=((2, 5),), stream_events=60)


@pytest.mark.parametrize("path", files(RIGHT, "s1"), ids=lambda p: p.stem)
async def test_every_right_fix_is_accepted(path: Path, workspace: Workspace) -> None:
    """Correct designs other than the lab's pass every attack (exit 0); the lab's own fix passes in the guide."""
    code, output = await check_file(workspace, path, SUITE_BUDGET)
    assert code == 0, output
    assert "PASS:" in output


def test_every_wrong_fix_file_is_named_in_the_table() -> None:
    """Each wrong fix for a graded scenario says what it must be caught doing, so none is added without a claim."""
    assert sorted(p.stem for p in WRONG.glob("s[1-4]_*.py")) == sorted(CAUGHT)


async def test_hypothesis_takes_over_past_the_exhaustive_bound(workspace: Workspace) -> None:
    """With room for one interleaving only (which holds), random schedules find the double charge, shrunk."""
    budget = Budget(pairs_limit=1)
    wrong = load(WRONG / "s1_ignored_on_conflict_result.py", "handle_charge")
    verdict = await grade(workspace, scenario(1), wrong, budget=budget)
    names = [a.name for a in verdict.attacks]
    assert "2 duplicate requests: the first 1 interleavings" in names
    assert verdict.failure is not None and verdict.failure.outcome is not None
    assert verdict.failure.attack == "2 duplicate requests: random schedules (hypothesis, shrunk)"
    assert verdict.failure.problems[0] == "key k1 charged 2 times (ch_1, ch_2)"
    order = verdict.failure.outcome.trace.order()
    assert sum(a != b for a, b in itertools.pairwise(order)) == 2


OWN_SCHEMA = '''
import lab

SCHEMA = "CREATE TABLE my_keys (key text PRIMARY KEY, response jsonb);"


async def handle_charge(db, provider, key, body):
    won = await db.fetchrow("INSERT INTO my_keys (key) VALUES ($1) ON CONFLICT DO NOTHING RETURNING key", key)
    if won is None:
        return lab.Response(409, {"error": "in flight or done"})
    return lab.Response(201, {"charge_id": await provider.charge(key, 1000)})
'''

TINY = Budget(pairs_limit=4, other_body_limit=4, triples_limit=4, random_examples=4, stress=((2, 2),))


async def test_a_file_may_bring_its_own_schema(tmp_path: Path, workspace: Workspace) -> None:
    """A file's own SCHEMA replaces the scenario's, so a learner may shape the table; its handler then runs."""
    verdict = await grade(workspace, scenario(1), load(write(tmp_path, "own.py", OWN_SCHEMA), "handle_charge"),
                          budget=TINY)
    assert verdict.attacks[0].name == "one request alone" and not verdict.attacks[0].failing
    assert verdict.failure is not None  # it never replays: a retry after the answer gets 409
    assert verdict.failure.problems[0].startswith("T2 came after T1 had answered 201")


async def test_a_handler_returning_a_dict_is_told_to_return_a_response(tmp_path: Path, workspace: Workspace) -> None:
    """Returning a dict where the contract says lab.Response is one line that names lab.Response."""
    path = write(tmp_path, "d.py", "async def handle_charge(db, provider, key, body):\n"
                                   "    return {'status': 201, 'charge_id': await provider.charge(key, 1000)}\n")
    with pytest.raises(CannotGrade) as raised:
        await grade(workspace, scenario(1), load(path, "handle_charge"), budget=TINY)
    assert "handle_charge returned a dict, not a lab.Response" in str(raised.value)
    assert "lab.Response(status, body)" in str(raised.value)


async def test_a_handler_returning_none_on_one_path_is_told_so(tmp_path: Path, workspace: Workspace) -> None:
    """A loser that returns None (no return on its path) fails with the words lab.Response, not "no answer"."""
    source = OWN_SCHEMA.replace('return lab.Response(409, {"error": "in flight or done"})', "return None")
    verdict = await grade(workspace, scenario(1), load(write(tmp_path, "n.py", source), "handle_charge"), budget=TINY)
    assert verdict.failure is not None
    assert any("handle_charge returned None, not a lab.Response" in p for p in verdict.failure.problems), verdict


async def test_a_schema_that_does_not_install_cannot_be_graded(tmp_path: Path, workspace: Workspace) -> None:
    """A SCHEMA PostgreSQL refuses is one line saying so."""
    path = write(tmp_path, "bad.py", 'SCHEMA = "CREATE TABEL x (a int);"\nasync def handle_charge(d, p, k, b): ...\n')
    with pytest.raises(CannotGrade, match=r"bad\.py: its SCHEMA does not install: syntax error"):
        await grade(workspace, scenario(1), load(path, "handle_charge"), budget=TINY)


# -- scenario 3: the lost transition, with crash points and provider faults -------------------------------------


async def check_lost(workspace: Workspace, path: Path, budget: Budget | None = None) -> tuple[int, str]:
    """What `lab check 3 FILE` does after provisioning."""
    console = recording()
    code = finish(console, await grade(workspace, scenario(3), load(path, "handle_charge"), 2.0, budget))
    return code, console.export_text()


@pytest.mark.parametrize("path", files(WRONG, "s3"), ids=lambda p: p.stem)
async def test_every_wrong_state_machine_is_rejected(path: Path, workspace: Workspace) -> None:
    """A plausible wrong four-state handler exits 1 with the failing run (a race, a crash, a fault) on a timeline."""
    code, output = await check_lost(workspace, path)
    assert code == 1, output
    assert "the simplest failing run" in output
    assert_caught(path, output)


@pytest.mark.parametrize("path", [ROOT / "fixes" / "s3_lost_transition.py", *files(RIGHT, "s3")],
                         ids=lambda p: p.stem)
async def test_every_right_state_machine_is_accepted(path: Path, workspace: Workspace) -> None:
    """The lab's fix and a row-locked state machine pass races, crashes, provider faults, late retries."""
    code, output = await check_lost(workspace, path, SUITE_BUDGET)
    assert code == 0, output


# -- scenario 4: the inbox consumer against the lab's relay ----------------------------------------------


async def check_inbox(workspace: Workspace, path: Path, budget: Budget | None = None) -> tuple[int, str]:
    """What `lab check 4 FILE` does after provisioning."""
    console = recording()
    code = finish(console, await grade(workspace, scenario(4), load(path, "handle_event"), 2.0, budget))
    return code, console.export_text()


@pytest.mark.parametrize("path", files(WRONG, "s4"), ids=lambda p: p.stem)
async def test_every_wrong_inbox_consumer_is_rejected(path: Path, workspace: Workspace) -> None:
    """A plausible wrong consumer exits 1 with the broken invariant on the timeline of the run that broke it."""
    code, output = await check_inbox(workspace, path)
    assert code == 1, output
    assert "the simplest failing run" in output
    assert_caught(path, output)


@pytest.mark.parametrize("path", [ROOT / "fixes" / "s4_inbox_double_apply.py", *files(RIGHT, "s4")],
                         ids=lambda p: p.stem)
async def test_every_right_inbox_consumer_is_accepted(path: Path, workspace: Workspace) -> None:
    """The lab's consumer and other correct designs pass every attack, crashes and malformed events included."""
    code, output = await check_inbox(workspace, path, SUITE_BUDGET)
    assert code == 0, output


def test_each_request_runs_in_its_own_copy_of_the_module(tmp_path: Path) -> None:
    """Module globals are not shared between requests, as they would not be between two servers."""
    submission = load(write(tmp_path, "g.py", "seen: set[str] = set()\nasync def handle_charge(d, p, k, b): ...\n"),
                      "handle_charge")
    first, second = submission.fresh(), submission.fresh()
    first.seen.add("k1")
    assert second.seen == set() and submission.module.seen == set()


# -- scenario 2: graded by lab.attacks.herd, in virtual time ----------------------------------------------------------


@pytest.mark.parametrize("path", files(WRONG, "s2"), ids=lambda p: p.stem)
def test_every_wrong_retry_wrapper_is_rejected(path: Path) -> None:
    """A plausible wrong retry loop fails the attack that exposes it, read from the simulated provider."""
    console = recording()
    assert finish(console, grade_retry(load(path, "call_with_retry"))) == 1
    assert_caught(path, console.export_text())


@pytest.mark.parametrize("path", [ROOT / "fixes" / "s2_retry_herd.py", *files(RIGHT, "s2")], ids=lambda p: p.stem)
def test_every_right_retry_wrapper_is_accepted(path: Path) -> None:
    """The lab's retry fix, decorrelated jitter and equal jitter pass every attack."""
    verdict = grade_retry(load(path, "call_with_retry"))
    assert verdict.failure is None, verdict.failure


def test_the_retry_verdict_is_check_retrys() -> None:
    """The workshop grades scenario 2 with exactly the rules of lab.attacks.retry_rules.check_retry."""
    buggy = load(ROOT / "scenarios" / "s2_retry_herd.py", "call_with_retry")
    verdict = grade_retry(buggy)
    assert verdict.failure is not None
    assert verdict.failure.problems == check_retry(buggy.function)


def test_a_retry_wrapper_that_raises_on_success_cannot_be_graded(tmp_path: Path) -> None:
    """A wrapper that raises even when fn succeeds at once is one line naming the file's line."""
    path = write(tmp_path, "r.py", "async def call_with_retry(fn, max_attempts=6):\n    return 1 / 0\n")
    with pytest.raises(CannotGrade) as raised:
        grade_retry(load(path, "call_with_retry"))
    assert "r.py, line 2: call_with_retry raised ZeroDivisionError" in str(raised.value)


def test_a_retry_wrapper_that_spins_forever_is_stopped(tmp_path: Path) -> None:
    """`lab check 2` on a wrapper that never yields ends with exit 2 and one line, within its deadline."""
    path = write(tmp_path, "spin.py", "async def call_with_retry(fn, max_attempts=6):\n    while True:\n"
                                      "        pass\n")
    started = time.monotonic()
    done = lab("check", "2", str(path), "--step-timeout", "0.1", dsn="postgresql://unused@127.0.0.1:1/x")
    assert time.monotonic() - started < 15
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "did not give control back for 1.5 s" in done.stderr



# -- the same file, the same verdict, the same failing run, every time --------------------------------------------


# Cheap wrong fixes, one per family; the first is caught by hypothesis (its exhaustive bound is 1 run).
SAME_EVERY_TIME = {
    "s1_ignored_on_conflict_result": Budget(pairs_limit=1),
    "s3_polls_every_second": None,
    "s4_check_then_apply": None,
}


@pytest.mark.parametrize("name", SAME_EVERY_TIME)
async def test_a_file_gets_the_same_verdict_and_the_same_failing_run_every_time(
    name: str, workspace: Workspace
) -> None:
    """Fixed attack order and fixed seeds: two checks of one wrong fix print the very same verdict and timeline."""
    info = scenario(int(name[1]))
    outputs = []
    for _ in range(2):
        console = recording()
        finish(console, await grade(workspace, info, load(WRONG / f"{name}.py", info.contract), 2.0,
                                    SAME_EVERY_TIME[name]))
        outputs.append(console.export_text())
    assert outputs[0] == outputs[1]
    assert "the simplest failing run" in outputs[0]


def test_a_retry_wrapper_gets_the_same_verdict_every_time() -> None:
    """Virtual time with a fixed seed: two checks of one wrong wrapper print the very same verdict."""
    outputs = []
    for _ in range(2):
        console = recording()
        finish(console, grade_retry(load(WRONG / "s2_jitter_too_small.py", "call_with_retry")))
        outputs.append(console.export_text())
    assert outputs[0] == outputs[1]
