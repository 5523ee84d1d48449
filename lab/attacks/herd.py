"""Scenario 2's attacks, run in virtual time against a simulated provider that remembers everything.

A retry wrapper is judged by what reaches the provider, never by what it says about itself: every
arrival is recorded (time, client, attempt, idempotency key) and every charge is counted, and the
figures of the issue are read from that record. The attack parameters and the invariant come from
``scenarios/s2_retry_herd.py``, which reads like an isolation spec; this module only executes it.

Figures are numbers, not adjectives, after Marc Brooker's backoff simulations ("Exponential Backoff
And Jitter", AWS Architecture Blog, 2015).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, NoneType
from typing import TYPE_CHECKING, Any, cast

from lab.contracts import ProviderError
from lab.engine.virtual_time import run_virtual
from lab.errors import LabError

if TYPE_CHECKING:
    pass

RetryWrapper = Callable[..., Awaitable[Any]]  # call_with_retry(fn, max_attempts=6)

SIDES = ("buggy", "fixed")


def side_wrapper(side: str) -> RetryWrapper:
    """The lab's own call_with_retry of one side, found through the registry like every scenario's code."""
    from lab.registry import scenario

    return cast(RetryWrapper, scenario("s2_retry_herd").module(side).call_with_retry)

MAX_CALLS_PER_CLIENT = 100  # a wrapper that never gives up is stopped here, and reported
MAX_VIRTUAL_S = 3600.0  # ... and so is one that sleeps forever
RETRY_AFTER_S = 2.0  # what the provider asks for on a 429 in the Retry-After attack


class _Runaway(BaseException):
    """Stops a client past MAX_CALLS_PER_CLIENT; a BaseException so ``except Exception`` cannot retry it."""


@dataclass(frozen=True)
class Arrival:
    t: float
    client: int
    attempt: int  # 1 for the client's first call
    key: str


Script = Callable[[float, int], Exception | None]  # (now, attempt) -> the error to answer (or raise), or None


class SimProvider:
    """The payment provider of the simulation: answers from a script, deduplicates by key like a real one.

    With ``lose_first_response`` it charges, then the response to each client's first call never
    arrives: the client waits ``timeout_s`` and sees ``TimeoutError`` (the ambiguous timeout).
    """

    def __init__(self, script: Script, *, lose_first_response: bool = False, timeout_s: float = 1.0) -> None:
        self.script = script
        self.lose_first_response = lose_first_response
        self.timeout_s = timeout_s
        self.arrivals: list[Arrival] = []
        self.charges: dict[str, int] = {}  # idempotency key -> client charged under it

    async def charge(self, client: int, attempt: int, key: str) -> str:
        loop = asyncio.get_running_loop()
        self.arrivals.append(Arrival(loop.time(), client, attempt, key))
        if attempt > MAX_CALLS_PER_CLIENT:
            raise _Runaway
        error = self.script(loop.time(), attempt)
        if error is not None:
            raise error
        self.charges.setdefault(key, client)  # a key seen before replays its charge: no new money moves
        if self.lose_first_response and attempt == 1:
            await asyncio.sleep(self.timeout_s)
            raise TimeoutError("no response from the provider")
        return f"ch_{key}"


@dataclass(frozen=True)
class Outcome:
    client: int
    finished_at: float
    error: BaseException | None  # what reached the caller; None on success

    @property
    def ok(self) -> bool:
        return self.error is None


async def _run_clients(wrapper: RetryWrapper, provider: SimProvider, clients: int) -> list[Outcome]:
    loop = asyncio.get_running_loop()

    async def one(client: int) -> Outcome:
        calls = 0

        async def request(idempotency_key: str | None = None) -> str:
            nonlocal calls
            calls += 1
            # Without a key from the wrapper, a naive client builds a new request, with a new key.
            return await provider.charge(client, calls, idempotency_key or f"c{client}-r{calls}")

        try:
            await wrapper(request)
            return Outcome(client, loop.time(), None)
        except (Exception, _Runaway) as err:
            return Outcome(client, loop.time(), err)

    return list(await asyncio.gather(*(one(c) for c in range(clients))))


def _attack(wrapper: RetryWrapper, provider: SimProvider, clients: int, seed: int) -> list[Outcome]:
    return run_virtual(lambda: _run_clients(wrapper, provider, clients), seed=seed, max_virtual_s=MAX_VIRTUAL_S)


@dataclass(frozen=True)
class Figures:
    """What one retry wrapper did under the four attacks (times in virtual seconds)."""

    clients: int
    buckets: list[int]  # herd: arrivals per bucket from t = 0
    peak_after_first_wave: int
    peak_after_recovery: int
    peak_after_recovery_at: float
    attempts: int
    successes: int
    gave_up: int
    gave_up_after: int  # the most calls a client that gave up had made (0: none gave up)
    last_finished_s: float
    permanent: dict[int, tuple[int, float]]  # status -> (most calls by one client, slowest failure)
    charges_per_client: int  # ambiguous timeout: most charges for one client
    clients_charged: int  # fewer than clients: some sent a key another client had used
    timeout_successes: int
    retry_after_waited_s: float | None  # None: the 429 was never retried
    flaky_successes: int  # a 503 then a 502, then 200
    first_error: str  # an unexpected exception a client saw, to show a learner
    immediate_retries: int = 0  # herd: retries that came at the very instant of the failure they retried


def measure(wrapper: RetryWrapper, *, clients: int = 100, seed: int = 1) -> Figures:
    """Run the herd, permanent-error, ambiguous-timeout, Retry-After and flaky attacks on one wrapper."""
    spec = load_spec()
    bucket_s, outage_s = float(spec.BUCKET_S), float(spec.OUTAGE_S)

    herd = SimProvider(lambda now, _: ProviderError(503) if now < outage_s else None)
    outcomes = _attack(wrapper, herd, clients, seed)
    buckets = _bucketize([a.t for a in herd.arrivals], bucket_s)
    calls_by = Counter(a.client for a in herd.arrivals)
    recovered = math.ceil(outage_s / bucket_s - 1e-9)
    after = buckets[recovered:] or [0]

    permanent: dict[int, tuple[int, float]] = {}
    for status in spec.PERMANENT_STATUSES:
        provider = SimProvider(_always(status))
        done = _attack(wrapper, provider, clients, seed)
        calls = Counter(a.client for a in provider.arrivals)
        permanent[status] = (max(calls.values()), max(o.finished_at for o in done))

    ambiguous = SimProvider(lambda _now, _: None, lose_first_response=True, timeout_s=spec.CLIENT_TIMEOUT_S)
    timed_out = _attack(wrapper, ambiguous, clients, seed)
    charged = Counter(ambiguous.charges.values())

    throttled = SimProvider(lambda _now, n: ProviderError(429, retry_after=RETRY_AFTER_S) if n == 1 else None)
    _attack(wrapper, throttled, 1, seed)
    gaps = [b.t - a.t for a, b in zip(throttled.arrivals, throttled.arrivals[1:], strict=False)]

    flaky = SimProvider(lambda _now, n: ProviderError(503 if n == 1 else 502) if n <= 2 else None)
    flaky_done = _attack(wrapper, flaky, clients, seed)
    foreign = [o.error for o in outcomes + flaky_done if not isinstance(o.error, (ProviderError, NoneType))]

    return Figures(
        clients=clients,
        buckets=buckets,
        peak_after_first_wave=max(buckets[1:] or [0]),
        peak_after_recovery=max(after),
        peak_after_recovery_at=(recovered + after.index(max(after))) * bucket_s,
        attempts=len(herd.arrivals),
        successes=sum(o.ok for o in outcomes),
        gave_up=sum(not o.ok for o in outcomes),
        gave_up_after=max((calls_by[o.client] for o in outcomes if not o.ok), default=0),
        last_finished_s=max(o.finished_at for o in outcomes),
        permanent=permanent,
        charges_per_client=max(charged.values(), default=0),
        clients_charged=len(charged),
        timeout_successes=sum(o.ok for o in timed_out),
        retry_after_waited_s=gaps[0] if gaps else None,
        flaky_successes=sum(o.ok for o in flaky_done),
        first_error=_describe(foreign[0]) if foreign else "",
        immediate_retries=_immediate(herd.arrivals),
    )


def _immediate(arrivals: Sequence[Arrival]) -> int:
    """Retries with no wait at all: the same client again at the very instant of its previous call's failure."""
    last: dict[int, float] = {}
    count = 0
    for arrival in sorted(arrivals, key=lambda a: (a.client, a.attempt)):
        if arrival.client in last and arrival.t - last[arrival.client] <= 1e-9:
            count += 1
        last[arrival.client] = arrival.t
    return count


def _describe(err: BaseException | None) -> str:
    if isinstance(err, _Runaway):
        return f"still retrying after {MAX_CALLS_PER_CLIENT} calls"
    return f"{type(err).__name__}: {err}"


def _always(status: int) -> Script:
    return lambda _now, _attempt: ProviderError(status)


def _bucketize(times: Sequence[float], bucket_s: float) -> list[int]:
    counts = [0] * (int(max(times, default=0) / bucket_s + 1e-9) + 1)
    for t in times:
        counts[int(t / bucket_s + 1e-9)] += 1  # 1e-9: 0.6000000000000001 s belongs to the 0.60 s bucket
    return counts


def violations(f: Figures) -> dict[str, str]:
    """The broken expectations, by name, in words a workshop participant can act on."""
    spec = load_spec()
    out: dict[str, str] = {}
    limit = f.clients * float(spec.MAX_PEAK_SHARE)
    if f.peak_after_recovery > limit:
        out["herd"] = (
            f"after the provider recovered, {f.peak_after_recovery} of {f.clients} clients arrived in one"
            f" 50 ms bucket (at {f.peak_after_recovery_at:.2f} s); at most {limit:g} may:"
            " draw every sleep at random (full jitter) so clients that failed together spread out"
        )
    for status, (calls, elapsed) in f.permanent.items():
        if calls > spec.MAX_CALLS_ON_PERMANENT or elapsed > 0:
            out[f"permanent {status}"] = (
                f"a {status} was sent {calls} times and reached the caller after {elapsed:.1f} s;"
                " a 4xx other than 429 will not change: fail after one call, at once"
            )
    if f.charges_per_client > spec.MAX_CHARGES_PER_CLIENT:
        out["charges"] = (
            f"a charge whose response timed out was charged {f.charges_per_client} times for one client:"
            " send the same idempotency key on every attempt (fn(idempotency_key=key))"
        )
    if f.clients_charged < f.clients:
        out["shared key"] = (
            f"{f.clients - f.clients_charged} of {f.clients} clients were never charged: their key had"
            " been used by another client, so the provider replayed someone else's charge:"
            " mint a fresh key per call_with_retry and reuse it only for that call's attempts"
        )
    if f.timeout_successes < f.clients:
        out["timeouts"] = (
            f"{f.clients - f.timeout_successes} of {f.clients} clients gave up after a timeout:"
            " TimeoutError must be retried"
        )
    waited = f.retry_after_waited_s
    if waited is None or waited < RETRY_AFTER_S:
        out["retry-after"] = (
            f"the provider answered 429 with Retry-After {RETRY_AFTER_S:g} s, "
            + ("and it was never retried" if waited is None else f"but the retry came after {waited:.2f} s")
            + ": wait at least ProviderError.retry_after"
        )
    if f.flaky_successes < f.clients:
        out["succeeds"] = (
            f"{f.clients - f.flaky_successes} of {f.clients} clients gave up on a provider that answered"
            " 503, then 502, then 200: 5xx must be retried"
            + (f" (first error seen: {f.first_error})" if f.first_error else "")
        )
    return out


def check_retry(call_with_retry: RetryWrapper) -> list[str]:
    """Grade any ``call_with_retry``: the broken expectations in plain words, empty when it passes."""
    if not inspect.iscoroutinefunction(call_with_retry):
        return ["call_with_retry must be an `async def` taking (fn, max_attempts=6)"]
    return list(violations(measure(call_with_retry, clients=int(load_spec().CLIENTS), seed=1)).values())


# --- loading the scenario files ----------------------------------------------------------------------


def load_module(path: str | Path) -> ModuleType:
    """Import a Python file by path, so a learner's copy needs no package around it."""
    path = Path(path)
    if not path.is_file():
        raise LabError(f"{path}: no such file; give the path of a .py file defining call_with_retry")
    spec = importlib.util.spec_from_file_location(f"_lab_s2_{abs(hash(str(path.resolve())))}", path)
    if spec is None or spec.loader is None:
        raise LabError(f"{path}: cannot be imported as Python; is it a .py file?")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise LabError(f"{path}: importing it failed: {type(err).__name__}: {err}") from err
    return module


def load_wrapper(path: str | Path) -> RetryWrapper:
    module = load_module(path)
    wrapper = getattr(module, "call_with_retry", None)
    if not callable(wrapper):
        raise LabError(f"{path}: defines no call_with_retry(fn, max_attempts=6)")
    return cast(RetryWrapper, wrapper)


def load_spec() -> ModuleType:
    """The scenario file: the attack parameters and the invariant live there, beside the handler."""
    from lab.registry import scenario

    return scenario("s2_retry_herd").module("buggy")


def bench_virtual_time(clients: int = 1000) -> float:
    """Clients simulated per wall-clock second through the herd attack, the slower of buggy and fixed."""
    spec = load_spec()
    slowest = 0.0
    for side in ("buggy", "fixed"):
        wrapper = side_wrapper(side)
        provider = SimProvider(lambda now, _: ProviderError(503) if now < spec.OUTAGE_S else None)
        start = time.perf_counter()
        _attack(wrapper, provider, clients, seed=1)
        slowest = max(slowest, time.perf_counter() - start)
    return clients / slowest
