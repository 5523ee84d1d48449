"""Every `lab run` flag does what it says or is refused in one line: no flag is silently ignored, none lies."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import ModuleType

import pytest
from rich.console import Console

import lab.journeys.herd as herd_journey
from lab.cli import _run_options, build_parser, run_scenario
from lab.errors import LabError
from lab.journeys.shared import RunOptions, progress_bar
from lab.postgres.provision import Postgres
from lab.registry import RUN_FLAGS, SCENARIOS, ScenarioInfo

ROOT = Path(__file__).resolve().parent.parent
LAB = [sys.executable, "-m", "lab.cli"]
#: A value each flag accepts (none of them its default), and what the journey must get from it.
SAMPLE = {"sessions": "2", "trials": "5", "concurrency": "3", "latency_ms": "2.5", "step_timeout": "3",
          "isolation": "serializable", "clients": "10", "seed": "0", "plot": "herd.png"}  # fmt: skip
PARSED = {"sessions": (2,), "trials": 5, "concurrency": (3,), "latency_ms": 2.5, "step_timeout": 3.0,
          "isolation": "serializable", "clients": 10, "seed": 0, "plot": "herd.png", "no_reduction": True}  # fmt: skip


def _options(*argv: str) -> tuple[ScenarioInfo, RunOptions]:
    args = build_parser().parse_args(["run", *argv])
    info = SCENARIOS[int(args.scenario)]
    return info, _run_options(args, info)


def _argv(dest: str) -> list[str]:
    return [RUN_FLAGS[dest], *([SAMPLE[dest]] if dest in SAMPLE else [])]


@pytest.mark.parametrize(
    ("number", "dest"),
    [(n, dest) for n, info in SCENARIOS.items() for dest in RUN_FLAGS if dest not in info.run_flags],
)
def test_a_flag_the_scenario_would_ignore_is_refused(number: int, dest: str) -> None:
    """Each flag a scenario's journey does not honour (the registry says which) is a LabError naming it."""
    with pytest.raises(LabError, match=f"scenario {number} .* does not take {RUN_FLAGS[dest]} "):
        _options(str(number), *_argv(dest))


@pytest.mark.parametrize(
    ("number", "dest"), [(n, dest) for n, info in SCENARIOS.items() for dest in sorted(info.run_flags)]
)
def test_a_flag_the_scenario_honours_reaches_its_journey(number: int, dest: str) -> None:
    """Each flag a scenario takes is accepted and lands in the journey's options with the value given."""
    _, options = _options(str(number), *_argv(dest))
    if dest in ("buggy", "fixed"):
        assert options.sides == (dest,)
    elif dest in ("explore", "stress", "crash"):
        assert getattr(options, dest) and not options.canonical
    else:
        assert getattr(options, dest) == PARSED[dest] != getattr(RunOptions(), dest)


@pytest.mark.parametrize(("number", "sessions"), [(1, "1"), (1, "9"), (3, "4"), (4, "4"), (1, "2,9")])
def test_sessions_out_of_bounds_are_refused_saying_the_bound(number: int, sessions: str) -> None:
    """One session cannot race and past the scenario's bound the search never ends: both are refused."""
    bound = SCENARIOS[number].max_sessions
    with pytest.raises(LabError, match=f"explores every interleaving of 2 to {bound} sessions"):
        _options(str(number), "--explore", "--sessions", sessions)


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--latency-ms", "nan", "must be a finite number, not nan"),
        ("--latency-ms", "inf", "must be a finite number, not inf"),
        ("--latency-ms", "-1", "must be 0 or more milliseconds, not -1"),
        ("--step-timeout", "0", "must be more than 0 seconds, not 0"),
        ("--step-timeout", "-1", "must be more than 0 seconds, not -1"),
    ],
)
def test_a_delay_or_timeout_that_is_no_number_of_seconds_is_one_line_and_exit_2(
    flag: str, value: str, said: str
) -> None:
    """nan, inf, a negative latency and a timeout of 0 or less are refused by the parser: one line, exit 2."""
    done = subprocess.run([*LAB, "run", "1", f"{flag}={value}"], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == f"lab: argument {flag}: {said} (see 'lab --help')"


def test_lab_check_refuses_a_step_timeout_of_zero_too() -> None:
    """`lab check --step-timeout 0` would blame a correct fix for making no progress: refused instead."""
    done = subprocess.run([*LAB, "check", "1", "--step-timeout", "0"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "must be more than 0 seconds" in done.stderr


def test_a_refused_flag_is_one_line_and_exit_2_before_any_database() -> None:
    """`lab run 2 --explore` is refused at once, naming what scenario 2 takes, without starting a server."""
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock", "LAB_DATABASE_URL": "postgresql://x@h:1/x"}
    done = subprocess.run([*LAB, "run", "2", "--explore"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "lab: scenario 2 (s2_retry_herd) does not take --explore (it takes --buggy, --fixed, --clients, --seed,"
        " --plot); scenarios 1, 3, 4 do"
    ]
    assert done.stdout == ""


def _lab(postgres: Postgres, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn}
    return subprocess.run([*LAB, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize("side", ["buggy", "fixed"])
def test_run_2_shows_one_side_of_the_herd(postgres: Postgres, side: str) -> None:
    """`lab run 2 --buggy` (what the guide puts on the projector) and `--fixed` plot that side alone, exit 0."""
    done = _lab(postgres, "run", "2", f"--{side}")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    other = "fixed" if side == "buggy" else "buggy"
    assert f"{side} (" in done.stdout and f"{other} (" not in done.stdout  # the panel's title names its policy
    assert "lab behaved as expected" in done.stdout


def test_run_4_crash_runs_the_crash_points_and_nothing_else(postgres: Postgres) -> None:
    """`lab run 4 --crash` crashes a delivery at every step boundary on both sides: reproduced, then held."""
    done = _lab(postgres, "run", "4", "--crash")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "crash points" in done.stdout and "interleavings" not in done.stdout and "stream" not in done.stdout
    assert "yes: bug reproduced" in done.stdout and "yes: fix held" in done.stdout


def test_a_long_exploration_stopped_with_ctrl_c_prints_what_it_found(postgres: Postgres) -> None:
    """Piped, `lab run 4 --explore --sessions 3 --no-reduction` says at once how long it is, and Ctrl-C prints its
    partial result (reduced, the same search takes under a second: see tests/test_reduction.py)."""
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn}
    argv = [*LAB, "run", "4", "--buggy", "--explore", "--sessions", "3", "--no-reduction"]
    proc = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        while "Ctrl-C stops it" not in (line := proc.stdout.readline()):
            assert line, f"it ended without announcing the search: {seen}"
            seen.append(line)
        assert "interleavings of 3 deliveries: about " in line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    stopped = [row for row in out.splitlines() if "stopped after" in row]
    assert len(stopped) == 1 and " runs; anomaly in " in stopped[0], out


def test_piped_progress_is_a_line_every_few_seconds_with_the_estimate() -> None:
    """When piped, a phase prints nothing for its first seconds, then one line per interval, saying how far."""
    now = [0.0]
    out = io.StringIO()
    console = Console(file=out, width=120)
    with progress_bar(console, "buggy: interleavings", 2_000, estimated=True, every=5, clock=lambda: now[0]) as tick:
        for done, at in [(10, 1.0), (400, 5.0), (500, 6.0), (1_000, 10.0)]:
            now[0] = at
            tick(done)
    assert out.getvalue().splitlines() == [
        "  buggy: interleavings: about 2,000 runs (an estimate); Ctrl-C stops it with the result so far",
        "  buggy: interleavings: 400 of about 2,000 after 5 s, about 20 s to go",
        "  buggy: interleavings: 1,000 of about 2,000 after 10 s, about 10 s to go",
    ]


def test_the_fixed_herd_says_its_verdict_and_its_cost() -> None:
    """At 1,000 clients the fix holds, and the line says how many clients gave up, after how many attempts."""
    out = io.StringIO()
    herd_journey.run_scenario_2(Console(file=out, width=120), sides=("fixed",), clients=1000, seed=1)
    verdict = [line for line in out.getvalue().splitlines() if line.startswith("fixed: ")]
    assert verdict == ["fixed: holds; its cost: 12 of 1,000 clients gave up after 6 attempts, all inside the outage"]


def test_the_plot_goes_where_the_user_said_and_its_default_name_is_ignored_by_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--plot is resolved from the directory lab runs in; a missing directory is one line; git ignores herd.png."""
    monkeypatch.chdir(tmp_path)
    assert herd_journey._plot_target("herd.png") == tmp_path / "herd.png"
    assert herd_journey._plot_target("~/x.png") == Path.home() / "x.png"
    with pytest.raises(LabError, match=f"--plot nowhere/x.png: there is no directory {tmp_path / 'nowhere'}"):
        herd_journey._plot_target("nowhere/x.png")
    ignored = subprocess.run(["git", "check-ignore", "-q", "herd.png"], cwd=ROOT, check=False)
    assert ignored.returncode == 0


class _FixThatIsTheBug(ScenarioInfo):
    """Scenario 1 with its fix replaced by the buggy handler: what a regression in fixes/ would look like."""

    def module(self, side: str) -> ModuleType:
        return super().module("buggy")


def test_a_run_whose_side_does_not_behave_exits_1(postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fix that breaks its invariant is exit 1 with the verdict saying so (the README's `lab run N` 1 cell)."""
    monkeypatch.setenv("LAB_DATABASE_URL", postgres.dsn)  # the suite's server, not one more
    broken = _FixThatIsTheBug(**{f.name: getattr(SCENARIOS[1], f.name) for f in fields(ScenarioInfo)})
    out = io.StringIO()
    options = RunOptions(sides=("fixed",), canonical=False, explore=True, stress=False, crash=False, sessions=(2,))
    assert run_scenario(Console(file=out, width=200), broken, options) == 1
    assert "NO: invariant broken" in out.getvalue()
