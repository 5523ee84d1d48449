"""Scenario 2's contract, rule by rule: each rule attacked on purpose, in virtual time, read from the provider's record.

``lab.attacks.herd`` measures what the scenario is about (a herd, a permanent error, a lost response,
a 429); this module derives an attack from every clause of the retry wrapper's contract, so that
none is checked only by the status codes one scenario happens to use:

* every 4xx is final, except 429 (408 and 409 may be retried or not: a 409 from an idempotent API
  means "in flight, retry later", the IETF draft says so): the whole range 400-499, one client each;
* every 5xx is retried, and so is a timeout: 500-599 and ``TimeoutError``, each once, then success;
* Retry-After is waited out, on a 429 and on a 503 alike, and a 429 that lasts is waited out each time;
* ``max_attempts`` means that many calls, no more and no fewer, then the last error reaches the caller;
* cancellation: when the caller's deadline cancels the call, ``CancelledError`` goes through at once
  (the caller's ``asyncio.timeout`` raises when it said it would) and no attempt follows it.

Every rule returns the problems it found, one sentence each, naming the rule; an empty list means it held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lab.attacks.herd import RetryWrapper, Script, SimProvider
from lab.contracts import ProviderError
from lab.engine.virtual_time import run_virtual

#: 4xx a wrapper may treat either way: 408 (the server timed the request out) and 409 (in flight).
EITHER_WAY = (408, 409)
FINAL = [s for s in range(400, 500) if s not in (*EITHER_WAY, 429)]
TRANSIENT = list(range(500, 600))
RETRY_AFTER_S = 3.0  # what the provider asks for in these attacks (the herd's own 429 asks for 2 s)
FEW_ATTEMPTS = 3  # max_attempts given to the wrapper in the attempts attack
SEED = 1
#: Full jitter with six attempts from 0.2 s sleeps less than 1 s in all about 1 time in 50, so a wrapper that
#: backs off serves nearly every client of a 1 s outage; one whose sleeps do not grow serves few of them.
MIN_SERVED = 0.9
MAX_VIRTUAL_S = 3600.0


@dataclass(frozen=True)
class Rule:
    """One clause of the contract: the attack's name, how many clients it sends, its check, the rule it tests."""

    name: str
    clients: int
    check: Callable[[RetryWrapper], list[str]]
    rule: str


@dataclass
class _Call:
    """One client's call through the wrapper: when it ended, what reached the caller, every arrival."""

    provider: SimProvider
    ended: float
    result: Any
    error: BaseException | None


def _one(wrapper: RetryWrapper, script: Script, *, max_attempts: int | None = None,
         deadline: float | None = None, call_s: float = 0.0) -> _Call:
    """One client against a provider playing ``script``; ``deadline`` cancels it as ``asyncio.timeout`` does."""
    provider = SimProvider(script)

    async def client() -> _Call:
        loop = asyncio.get_running_loop()
        calls = 0

        async def request(idempotency_key: str | None = None) -> str:
            nonlocal calls
            calls += 1
            if call_s:
                await asyncio.sleep(call_s)  # the call takes a while: a deadline can fall inside it
            return await provider.charge(0, calls, idempotency_key or f"c0-r{calls}")

        kwargs = {} if max_attempts is None else {"max_attempts": max_attempts}
        try:
            if deadline is None:
                result = await wrapper(request, **kwargs)
            else:
                async with asyncio.timeout(deadline):
                    result = await wrapper(request, **kwargs)
        except BaseException as exc:  # whatever reached the caller, cancellation included, is the observation
            return _Call(provider, loop.time(), None, exc)
        return _Call(provider, loop.time(), result, None)

    return run_virtual(client, seed=SEED, max_virtual_s=MAX_VIRTUAL_S)


def _once(error: Exception) -> Script:
    """The provider answers ``error`` to the first call, then succeeds."""
    return lambda _now, attempt: error if attempt == 1 else None


def _always(error: Exception) -> Script:
    return lambda _now, _attempt: error


def _statuses(statuses: Sequence[int]) -> str:
    """400-407, 410-428: runs of consecutive statuses, as a person would write them."""
    runs: list[list[int]] = []
    for status in statuses:
        if runs and status == runs[-1][-1] + 1:
            runs[-1].append(status)
        else:
            runs.append([status])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _is_status(error: BaseException | None, status: int) -> bool:
    """The provider's own answer reached the caller: that ProviderError, or one it was raised from."""
    while error is not None:
        if isinstance(error, ProviderError) and error.status == status:
            return True
        error = error.__cause__ or error.__context__
    return False


def final_4xx(wrapper: RetryWrapper) -> list[str]:
    hammered: list[tuple[int, int, float]] = []
    swallowed: list[int] = []
    for status in FINAL:
        call = _one(wrapper, _always(ProviderError(status)))
        if len(call.provider.arrivals) > 1 or call.ended > 0:
            hammered.append((status, len(call.provider.arrivals), call.ended))
        elif not _is_status(call.error, status):
            swallowed.append(status)
    problems = []
    if hammered:
        status, calls, ended = hammered[0]
        others = [h[0] for h in hammered[1:]]
        problems.append(
            f"a 4xx other than 429 is final (408 and 409 may go either way): a {status} was sent {calls} times and"
            f" reached the caller after {ended:.1f} s; fail after one call, at once"
            + (f" (the same for {_statuses(others)})" if others else "")
        )
    if swallowed:
        problems.append(
            f"a 4xx other than 429 is final: for {_statuses(swallowed)} the caller did not get the provider's"
            " ProviderError with that status: raise it (or raise from it)"
        )
    return problems


def transient_retried(wrapper: RetryWrapper) -> list[str]:
    dropped = [s for s in TRANSIENT
               if _one(wrapper, _once(ProviderError(s))).error is not None]
    timed_out = _one(wrapper, _once(TimeoutError("no answer")))
    problems = []
    if dropped:
        problems.append(f"every 5xx is retried: after {_statuses(dropped)} once, then 200, the caller got the error")
    if timed_out.error is not None:
        problems.append("a timeout is retried: after one TimeoutError, then 200, the caller got"
                        f" {type(timed_out.error).__name__}")
    return problems


def retry_after(wrapper: RetryWrapper) -> list[str]:
    problems = []
    for status in (429, 503):
        call = _one(wrapper, _once(ProviderError(status, retry_after=RETRY_AFTER_S)))
        times = [a.t for a in call.provider.arrivals]
        if len(times) < 2:
            problems.append(f"Retry-After is waited out: a {status} with Retry-After {RETRY_AFTER_S:g} s was never"
                            " retried" + ("" if status == 503 else " (a 429 must be retried)"))
        elif times[1] - times[0] < RETRY_AFTER_S:
            problems.append(f"Retry-After is waited out: a {status} asked for {RETRY_AFTER_S:g} s (ProviderError"
                            f".retry_after), but the retry came after {times[1] - times[0]:.2f} s")
    sustained = _one(wrapper, _always(ProviderError(429, retry_after=RETRY_AFTER_S)))
    gaps = [b.t - a.t for a, b in zip(sustained.provider.arrivals, sustained.provider.arrivals[1:], strict=False)]
    early = [g for g in gaps if g < RETRY_AFTER_S]
    if early and not problems:
        problems.append(f"Retry-After is waited out every time: a 429 that lasts asked for {RETRY_AFTER_S:g} s on"
                        f" each of {len(gaps) + 1} calls, but {len(early)} retries came sooner ({min(early):.2f} s)")
    return problems


def attempts(wrapper: RetryWrapper) -> list[str]:
    problems = []
    for given in (FEW_ATTEMPTS, None):
        call = _one(wrapper, _always(ProviderError(503)), max_attempts=given)
        expected = given or 6
        calls = len(call.provider.arrivals)
        said = f"max_attempts={given}" if given else "the default max_attempts (6)"
        if calls != expected:
            problems.append(f"max_attempts is the number of calls: with {said} and a provider that always answers"
                            f" 503, fn was called {calls} times")
        elif not _is_status(call.error, 503):
            got = "nothing" if call.error is None else type(call.error).__name__
            problems.append(f"after the last attempt the last error reaches the caller: with {said}, every call"
                            f" answered 503, and the caller got {got}")
    return problems


def cancellation(wrapper: RetryWrapper) -> list[str]:
    """The caller's deadline falls in a sleep between attempts, and in a call in flight; 20 deadlines in all."""
    problems = []
    for i in range(20):
        deadline = 0.03 + 0.05 * i  # calls take 0.1 s each: deadlines land in calls and in sleeps
        call = _one(wrapper, _always(ProviderError(503)), deadline=deadline, call_s=0.1)
        late = [a for a in call.provider.arrivals if a.t > deadline + 1e-9]
        if call.ended < deadline - 1e-9 and not late:
            continue  # it gave up (or succeeded) on its own before the deadline: nothing was cancelled
        if late or call.ended > deadline + 1e-9 or not isinstance(call.error, TimeoutError):
            got = "a result" if call.error is None else type(call.error).__name__
            problems.append(
                f"cancellation goes through at once: the caller's deadline cancelled the call at {deadline:.2f} s,"
                f" but {len(late)} attempts followed and the caller got {got} at {call.ended:.2f} s; never catch"
                " asyncio.CancelledError (catch Exception, or re-raise it)"
            )
            break
    return problems


RULES = [
    Rule("every 4xx but 429 is final: 400-499 (408, 409 either way)", len(FINAL), final_4xx,
         "a 4xx other than 429 is final: one call, and its error reaches the caller at once"),
    Rule("every 5xx and a timeout are retried: 500-599, then 200", len(TRANSIENT) + 1, transient_retried,
         "a 5xx and a timeout are retried"),
    Rule(f"Retry-After {RETRY_AFTER_S:g} s on a 429, a 503, and a 429 that lasts", 3, retry_after,
         "Retry-After is waited out, every time it is given"),
    Rule(f"max_attempts: {FEW_ATTEMPTS} and the default, against a lasting 503", 2, attempts,
         "max_attempts is the number of calls, then the last error reaches the caller"),
    Rule("cancellation: the caller's deadline in a call and in a sleep", 20, cancellation,
         "cancellation goes through at once, and no attempt follows it"),
]


# -- the whole battery, as lab check 2 runs it ---------------------------------------------------------------

#: Which of ``lab.attacks.herd``'s expectations belong to which of its attacks (the rest the rules cover).
SCENARIO_ATTACKS = {
    "herd": (("herd", "immediate", "served"), "clients that failed together do not retry together, and outlast a"
             " short outage"),
    "ambiguous": (("charges", "shared key", "timeouts"), "a retry is the same request: one idempotency key for"
                  " every attempt of a call, another for every call"),
    "flaky": (("succeeds",), "a 5xx and a timeout are retried"),
}


def battery(wrapper: RetryWrapper) -> list[tuple[str, int, str, list[str]]]:
    """Every attack in its fixed order: (name, clients, rule, problems). The scenario's own, then each rule's."""
    from lab.attacks.herd import load_spec, measure, violations

    spec = load_spec()
    clients = int(spec.CLIENTS)
    figures = measure(wrapper, clients=clients, seed=SEED)
    broken = violations(figures)
    if figures.successes < MIN_SERVED * clients:
        broken["served"] = (
            f"backoff outlasts a short outage: the provider was down for {float(spec.OUTAGE_S):g} s, and"
            f" {figures.gave_up} of {clients} clients gave up (at most {(1 - MIN_SERVED) * clients:g} may): let"
            " each sleep's range grow (full jitter: uniform(0, min(cap, base * 2 ** attempt)))"
        )
    if figures.immediate_retries:
        broken["immediate"] = (
            f"every retry waits: {figures.immediate_retries} retries came at the very instant of the failure they"
            " retried, all clients together; draw every sleep at random from a range above 0 (full jitter)"
        )
    names = {
        "herd": f"herd: provider down for {float(spec.OUTAGE_S):g} s, then up",
        "ambiguous": "ambiguous timeout: charged, then the response lost",
        "flaky": "flaky: 503, then 502, then 200",
    }
    found = [(names[a], clients, rule, [broken[k] for k in keys if k in broken])
             for a, (keys, rule) in SCENARIO_ATTACKS.items()]
    return found + [(r.name, r.clients, r.rule, r.check(wrapper)) for r in RULES]


def check_retry(wrapper: RetryWrapper) -> list[str]:
    """Grade any ``call_with_retry`` as ``lab check 2`` does: every broken rule in words, empty when it passes."""
    import inspect

    if not inspect.iscoroutinefunction(wrapper):
        return ["call_with_retry must be an `async def` taking (fn, max_attempts=6)"]
    return [problem for _, _, _, problems in battery(wrapper) for problem in problems]
