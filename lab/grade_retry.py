"""Scenario 2's grading for ``lab check``: a retry wrapper against ``lab.herd``'s attacks, in virtual time.

No database and no real sleeping: a hundred clients against a simulated provider that records every
arrival and charge, and the verdict is read from that record.
"""

from __future__ import annotations

from lab.grader import Attack, CannotGrade, Failure, Verdict
from lab.submission import Submission


def grade_retry(submission: Submission) -> Verdict:
    """Scenario 2: a lone call first (one clear line if even that raises), then ``lab.herd``'s attacks.

    The verdict is ``lab.herd.check_retry``'s: the same ``violations`` of the same ``measure``, kept
    by name here only to mark which attack each one broke.
    """
    from lab.herd import load_spec, measure, violations  # deferred: scenario 2 needs no database
    from lab.virtual_time import run_virtual

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
    spec = load_spec()
    clients = int(spec.CLIENTS)
    statuses = tuple(int(s) for s in spec.PERMANENT_STATUSES)
    attacks = {
        "herd": Attack(f"herd: provider down for {float(spec.OUTAGE_S):g} s, then up", clients, "clients"),
        "permanent": Attack("permanent errors: " + " and ".join(map(str, statuses)) + " to every call",
                            clients * len(statuses), "clients"),
        "ambiguous": Attack("ambiguous timeout: charged, then the response lost", clients, "clients"),
        "throttled": Attack("throttled: 429 with Retry-After", 1, "clients"),
        "flaky": Attack("flaky: 503, then 502, then 200", clients, "clients"),
    }
    which = {"herd": "herd", "charges": "ambiguous", "shared key": "ambiguous", "timeouts": "ambiguous",
             "retry-after": "throttled", "succeeds": "flaky"}
    broken = violations(measure(wrapper, clients=clients, seed=1))
    for name in broken:
        attacks[which.get(name, "permanent")].failing += 1
    verdict.attacks += attacks.values()
    if broken:
        failed = [a for a in attacks.values() if a.failing]
        verdict.failure = Failure(", ".join(a.name.split(":")[0] for a in failed), len(failed), len(attacks), None,
                                  list(broken.values()), [
            "Each line above is read from the simulated provider's record of every arrival and charge, in"
            " virtual time: what reached the provider, not what the wrapper says about itself.",
        ], unit="attacks")
    return verdict
