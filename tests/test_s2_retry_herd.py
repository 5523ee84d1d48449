"""Scenario 2: the buggy retry loop shows its hazards and the fix holds, read from the provider's record.

Everything runs seeded, in virtual time; the last two run Brooker's table on Postgres, on a virtual clock.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from rich.console import Console

import fixes.s2_retry_herd as fixed_module
import scenarios.s2_retry_herd as buggy_module
from lab.attacks import herd
from lab.attacks.herd import Figures, SimProvider, check_retry, load_wrapper, measure
from lab.attacks.herd_occ import run_occ_table
from lab.contracts import ProviderError
from lab.engine.virtual_time import run_virtual
from lab.errors import LabError
from lab.journeys.herd import run_scenario_2
from lab.postgres.provision import Postgres

N = 100
BUGGY = buggy_module.call_with_retry
FIXED = fixed_module.call_with_retry


def _one_client(wrapper: herd.RetryWrapper, provider: SimProvider) -> None:
    run_virtual(lambda: herd._run_clients(wrapper, provider, 1), seed=1)


@pytest.fixture(scope="module")
def buggy() -> Figures:
    return measure(BUGGY, clients=N, seed=1)


@pytest.fixture(scope="module")
def fixed() -> Figures:
    return measure(FIXED, clients=N, seed=1)


def test_buggy_sends_every_retry_in_the_same_bucket(buggy: Figures) -> None:
    """All N clients arrive together at 0, 0.2, 0.6 and 1.4 s, and nowhere else."""
    nonempty = {i: n for i, n in enumerate(buggy.buckets) if n}
    assert nonempty == {0: N, 4: N, 12: N, 28: N}  # bucket i starts at i x 50 ms: 0, 0.2, 0.6, 1.4 s
    assert (buggy.peak_after_first_wave, buggy.peak_after_recovery) == (N, N)
    assert (buggy.attempts, buggy.successes, buggy.gave_up) == (4 * N, N, 0)
    assert buggy.last_finished_s == pytest.approx(1.4)


def test_fixed_spreads_the_herd_once_the_provider_recovers(fixed: Figures) -> None:
    """With full jitter no 50 ms bucket after recovery sees more than a fifth of the clients."""
    assert fixed.peak_after_recovery <= N / 5
    assert fixed.peak_after_first_wave < N
    assert fixed.successes + fixed.gave_up == N
    assert fixed.successes >= 0.95 * N


def test_fixed_holds_for_a_thousand_clients() -> None:
    """The fifth-of-N bound holds at the benchmark's scale too."""
    thousand = measure(FIXED, clients=1000, seed=1)
    assert thousand.peak_after_recovery <= 1000 / 5
    assert thousand.successes >= 950


@pytest.mark.parametrize("status", [402, 400])
def test_buggy_hammers_a_permanent_error_six_times_over_six_seconds(buggy: Figures, status: int) -> None:
    """A declined card or a bad request is sent 6 times, and the caller hears after 6.2 s."""
    calls, elapsed = buggy.permanent[status]
    assert calls == 6
    assert elapsed == pytest.approx(6.2)


@pytest.mark.parametrize("status", [402, 400])
def test_fixed_fails_a_permanent_error_after_one_call_at_once(fixed: Figures, status: int) -> None:
    """A 4xx other than 429 is final: one call, and the error reaches the caller at t = 0."""
    assert fixed.permanent[status] == (1, 0.0)


def test_buggy_charges_again_after_an_ambiguous_timeout(buggy: Figures) -> None:
    """A retry with a fresh key after a lost response is a second charge."""
    assert buggy.charges_per_client > 1


def test_fixed_charges_once_after_an_ambiguous_timeout(fixed: Figures) -> None:
    """The same key on the retry makes the provider replay the first charge, and the client succeeds."""
    assert fixed.charges_per_client == 1
    assert fixed.timeout_successes == N


def test_arrival_times_of_one_buggy_client_follow_the_doubling() -> None:
    """One client against a provider that always fails calls at 0, 0.2, 0.6, 1.4, 3.0 and 6.2 s."""
    provider = SimProvider(lambda _now, _attempt: ProviderError(503))
    _one_client(BUGGY, provider)
    assert [a.t for a in provider.arrivals] == pytest.approx([0.0, 0.2, 0.6, 1.4, 3.0, 6.2])


def test_keys_fresh_per_attempt_when_buggy_and_shared_when_fixed() -> None:
    """The buggy loop lets the client mint a key per attempt; the fix sends one key on every attempt."""
    keys = {}
    for name, wrapper in (("buggy", BUGGY), ("fixed", FIXED)):
        provider = SimProvider(lambda _now, n: ProviderError(503) if n < 4 else None)
        _one_client(wrapper, provider)
        keys[name] = [a.key for a in provider.arrivals]
    assert len(keys["buggy"]) == len(set(keys["buggy"])) == 4
    assert len(keys["fixed"]) == 4 and len(set(keys["fixed"])) == 1


def test_fixed_waits_out_retry_after_and_buggy_does_not(buggy: Figures, fixed: Figures) -> None:
    """A 429 with Retry-After 2 s is retried after at least 2 s by the fix, after 0.2 s by the bug."""
    assert fixed.retry_after_waited_s is not None and fixed.retry_after_waited_s >= herd.RETRY_AFTER_S
    assert buggy.retry_after_waited_s == pytest.approx(0.2)


def test_a_seed_makes_the_fixed_run_repeatable() -> None:
    """Two runs with one seed record the same arrivals; another seed records different ones."""
    assert measure(FIXED, clients=N, seed=3) == measure(FIXED, clients=N, seed=3)
    assert measure(FIXED, clients=N, seed=3).buckets != measure(FIXED, clients=N, seed=4).buckets


def test_check_retry_passes_the_fix_and_names_each_hazard_of_the_bug() -> None:
    """The grader is silent on the fix and says, in words, what is wrong with the snippet's loop."""
    assert check_retry(FIXED) == []
    problems = "\n".join(check_retry(BUGGY))
    for words in (
        "100 of 100 clients arrived in one 50 ms bucket",
        "a 402 was sent 6 times",
        "a 400 was sent 6 times",
        "charged 2 times",
        "Retry-After",
    ):
        assert words in problems


def test_check_retry_catches_a_loop_that_never_gives_up() -> None:
    """A wrapper retrying forever without sleeping is stopped by the provider and reported, not hung on."""

    async def forever(fn: Callable[..., Awaitable[Any]], max_attempts: int = 6) -> Any:
        while True:
            try:
                return await fn()
            except Exception:
                continue

    problems = "\n".join(check_retry(forever))
    assert f"sent {herd.MAX_CALLS_PER_CLIENT + 1} times" in problems


def test_check_retry_catches_a_loop_that_never_retries() -> None:
    """No retry at all passes the herd and the permanent errors but fails on 5xx and timeouts."""

    async def once(fn: Callable[..., Awaitable[Any]], max_attempts: int = 6) -> Any:
        return await fn()

    problems = "\n".join(check_retry(once))
    assert "TimeoutError must be retried" in problems
    assert "5xx must be retried" in problems
    assert "herd" not in problems and "was sent" not in problems


def test_check_retry_catches_one_key_shared_by_every_client() -> None:
    """A constant idempotency key dedupes across clients, so all but one are never charged."""

    async def constant_key(fn: Callable[..., Awaitable[Any]], max_attempts: int = 6) -> Any:
        return await FIXED(lambda **_: fn(idempotency_key="same-for-everyone"), max_attempts)

    problems = "\n".join(check_retry(constant_key))
    assert f"{N - 1} of {N} clients were never charged" in problems


def test_check_retry_refuses_a_function_that_is_not_async() -> None:
    """A plain def cannot wrap an async request, and the grader says so instead of crashing."""

    def not_async(fn: Callable[..., Any], max_attempts: int = 6) -> Any:
        return fn()

    assert check_retry(not_async) == ["call_with_retry must be an `async def` taking (fn, max_attempts=6)"]


def test_run_scenario_2_exits_0_and_reads_plainly_when_piped() -> None:
    """Piped output has no escape codes, shows both plots, the figures and the verdict, and exits 0."""
    out = io.StringIO()
    assert run_scenario_2(Console(file=out, width=100), clients=N, seed=1) == 0
    text = out.getvalue()
    assert "\x1b" not in text
    for words in (
        "buggy (fixed doubling, no jitter, every error retried): arrivals per 50 ms",
        "fixed (full jitter): arrivals per 50 ms",
        "6 in 6.2 s",
        "1 in 0.0 s",
        "buggy: hazards reproduced",
        "fixed: holds",
        "verdict: lab behaved as expected",
    ):
        assert words in text


def test_run_scenario_2_exits_1_when_the_fixed_side_is_still_broken() -> None:
    """A learner's file that is the unfixed loop is graded like the fix, so the lab exits 1."""
    out = io.StringIO()
    code = run_scenario_2(Console(file=out, width=100), retry_module_path=buggy_module.__file__)
    assert code == 1
    assert "s2_retry_herd.py: BROKEN" in out.getvalue()


def test_plot_path_without_matplotlib_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for a PNG without matplotlib fails before any work, with the command that fixes it: the README's."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(LabError, match=r"--plot needs matplotlib: in the repository, pip install -e '\.\[plot\]' "):
        run_scenario_2(Console(file=io.StringIO()), plot_path="herd.png")
    assert "`pip install -e '.[plot]'`" in (Path(__file__).parent.parent / "README.md").read_text()


def test_a_learner_file_without_call_with_retry_is_a_lab_error(tmp_path: Path) -> None:
    """A file that defines the wrong thing is reported by name, not as a traceback."""
    wrong = tmp_path / "mine.py"
    wrong.write_text("def retry(fn):\n    return fn()\n")
    with pytest.raises(LabError, match="defines no call_with_retry"):
        load_wrapper(wrong)


async def test_full_jitter_makes_fewer_writes_than_no_jitter_on_postgres(postgres: Postgres) -> None:
    """On one contended row at N=25, full jitter attempts fewer writes than no jitter (as the server recorded
    them), and the schema goes.

    The clients' statements run one at a time on a virtual clock, so this is one outcome on any machine
    (in real time, load alone once made no jitter come out ahead).
    """
    rows = await run_occ_table(Console(file=io.StringIO()), postgres.dsn, clients=(25,), seed=1)
    calls = {r.policy: r.calls for r in rows}
    assert calls["full jitter"] < calls["no jitter"]
    conn = await asyncpg.connect(postgres.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'lab_occ_%'") == 0
    finally:
        await conn.close()


async def test_brookers_table_is_the_same_for_the_same_seed(postgres: Postgres) -> None:
    """Two runs of one seed give the same calls and the same virtual times, cell for cell."""
    runs = [await run_occ_table(Console(file=io.StringIO()), postgres.dsn, clients=(10,), seed=7) for _ in "ab"]
    assert runs[0] == runs[1]
