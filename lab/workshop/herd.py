"""Scenario 2's grading for ``lab check``: a retry wrapper against its contract, rule by rule, in virtual time.

No database and no real sleeping: simulated providers record every arrival and charge, and the
verdict is read from that record. The attacks are ``lab.attacks.retry_rules.battery``: the scenario's
own (a herd, a lost response, a flaky provider) and one per clause of the contract (every 4xx, every
5xx, Retry-After, max_attempts, cancellation).
"""

from __future__ import annotations

from lab.workshop.grading import Attack, CannotGrade, Failure, Verdict
from lab.workshop.submission import Submission

ADVICE = (
    "Each line above is read from the simulated provider's record of every arrival and charge, in virtual"
    " time: what reached the provider, not what the wrapper says about itself. The contract: retry only what"
    " can go away by itself (lab.ProviderError with a 5xx or 429, and TimeoutError), after a random sleep"
    " (full jitter) of at least the provider's Retry-After (ProviderError.retry_after, in seconds); make at"
    " most max_attempts calls, all with one idempotency key (fn(idempotency_key=key)), then raise the last"
    " error; and let asyncio.CancelledError through at once."
)


def grade_retry(submission: Submission) -> Verdict:
    """Scenario 2: a lone call first (one clear line if even that raises), then every attack of the battery."""
    from lab.attacks.retry_rules import battery  # deferred: scenario 2 needs no database
    from lab.engine.virtual_time import run_virtual

    wrapper = submission.function

    async def ok(idempotency_key: str | None = None) -> str:
        return "ch_1"

    try:
        answer = run_virtual(lambda: wrapper(ok), seed=1, max_virtual_s=60.0)
    except Exception as exc:
        line = submission.where(exc)
        raise CannotGrade(
            f"{submission.path}{', ' + line if line else ''}: call_with_retry raised {type(exc).__name__}: {exc}"
            " when fn succeeded on its first call; fix that first"
        ) from exc
    verdict = Verdict([Attack("one call that succeeds at once", 1, "clients")])
    if answer != "ch_1":
        problem = f"fn returned 'ch_1', but call_with_retry returned {answer!r}"
        verdict.attacks[0].failing = 1
        verdict.failure = Failure(verdict.attacks[0].name, 1, 1, None, [problem],
                                  ["call_with_retry must return what fn returned."], unit="calls")
        return verdict
    problems: list[str] = []
    rules: list[str] = []
    for name, clients, rule, broken in battery(wrapper):
        verdict.attacks.append(Attack(name, clients, "clients", failing=int(bool(broken))))
        problems += broken
        rules += [f"Rule broken: {rule}."] if broken else []
    failed = [a for a in verdict.attacks if a.failing]
    if failed:
        verdict.failure = Failure(", ".join(a.name.split(":")[0] for a in failed), len(failed),
                                  len(verdict.attacks) - 1, None, problems, [*dict.fromkeys(rules), ADVICE],
                                  unit="attacks")
    return verdict
