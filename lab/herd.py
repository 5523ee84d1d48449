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

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lab.contracts import ProviderError
from lab.errors import LabError
from lab.virtual_time import run_virtual

if TYPE_CHECKING:
    from lab.journey import RunOptions
    from lab.registry import ScenarioInfo
    from lab.workspace import Workspace

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


Script = Callable[[float, int], ProviderError | None]  # (now, attempt) -> the error to answer, or None


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
    last_finished_s: float
    permanent: dict[int, tuple[int, float]]  # status -> (most calls by one client, slowest failure)
    charges_per_client: int  # ambiguous timeout: most charges for one client
    clients_charged: int  # fewer than clients: some sent a key another client had used
    timeout_successes: int
    retry_after_waited_s: float | None  # None: the 429 was never retried
    flaky_successes: int  # a 503 then a 502, then 200
    first_error: str  # an unexpected exception a client saw, to show a learner


def measure(wrapper: RetryWrapper, *, clients: int = 100, seed: int = 1) -> Figures:
    """Run the herd, permanent-error, ambiguous-timeout, Retry-After and flaky attacks on one wrapper."""
    spec = load_spec()
    bucket_s, outage_s = float(spec.BUCKET_S), float(spec.OUTAGE_S)

    herd = SimProvider(lambda now, _: ProviderError(503) if now < outage_s else None)
    outcomes = _attack(wrapper, herd, clients, seed)
    buckets = _bucketize([a.t for a in herd.arrivals], bucket_s)
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
        last_finished_s=max(o.finished_at for o in outcomes),
        permanent=permanent,
        charges_per_client=max(charged.values(), default=0),
        clients_charged=len(charged),
        timeout_successes=sum(o.ok for o in timed_out),
        retry_after_waited_s=gaps[0] if gaps else None,
        flaky_successes=sum(o.ok for o in flaky_done),
        first_error=_describe(foreign[0]) if foreign else "",
    )


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


# --- the report -------------------------------------------------------------------------------------


def run_scenario_2(
    console: Console,
    *,
    sides: tuple[str, ...] = ("buggy", "fixed"),
    clients: int = 100,
    seed: int = 1,
    plot_path: str | None = None,
    retry_module_path: str | None = None,
) -> int:
    """Show the herd and its fix; 0 when the buggy loop shows its hazards and the fixed one holds.

    ``retry_module_path`` replaces the fixed side (adding it if absent) with a learner's file, graded
    like the fix.
    Synchronous on purpose: it runs its own virtual-time loops, so call it outside any running loop.
    """
    if retry_module_path is not None and "fixed" not in sides:
        sides = (*sides, "fixed")
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        raise LabError(f"unknown side {unknown}: choose from {', '.join(SIDES)}")
    if plot_path is not None:
        _require_matplotlib()
    labels: dict[str, str] = {}
    figures: dict[str, Figures] = {}
    for side in sides:
        learners = side == "fixed" and retry_module_path is not None
        label = Path(retry_module_path).name if learners and retry_module_path else side
        wrapper = load_wrapper(retry_module_path) if learners and retry_module_path else side_wrapper(side)
        labels[side] = label
        figures[label] = measure(wrapper, clients=clients, seed=seed)

    console.print(
        f"scenario 2 · retry herd · {clients} clients · provider answers 503 for its first"
        f" {float(load_spec().OUTAGE_S):g} s · seed {seed} · virtual time",
        highlight=False,
    )
    print_herd_plot(console, figures)
    console.print(_table(figures))

    healthy = True
    for side, label in labels.items():
        broken = violations(figures[label])
        if side == "buggy":
            expected = {"herd", "charges"} | {f"permanent {s}" for s in load_spec().PERMANENT_STATUSES}
            missing = sorted(expected - broken.keys())
            healthy &= not missing
            verdict = f"hazards not reproduced: {', '.join(missing)}" if missing else "hazards reproduced"
            console.print(f"{label}: {verdict}", highlight=False)
            for name in (n for n in broken if n in expected):
                console.print(f"  - {broken[name]}", highlight=False)
        else:
            healthy &= not broken
            console.print(f"{label}: " + ("holds" if not broken else "BROKEN"), highlight=False)
            for message in broken.values():
                console.print(f"  - {message}", highlight=False)
    if plot_path is not None:
        write_herd_png(plot_path, figures)
        console.print(f"plot written to {plot_path}", highlight=False)
    console.print("verdict: " + ("lab behaved as expected" if healthy else "UNEXPECTED: see above"))
    return 0 if healthy else 1


def _table(figures: dict[str, Figures]) -> Table:
    table = Table(title="what reached the provider", title_justify="left")
    table.add_column("figure")
    for label in figures:
        table.add_column(label, justify="right")
    spec = load_spec()
    rows: list[tuple[str, Callable[[Figures], str]]] = [
        ("herd: peak arrivals / 50 ms after the first wave", lambda f: str(f.peak_after_first_wave)),
        (
            f"herd: peak / 50 ms after recovery (limit N/{round(1 / spec.MAX_PEAK_SHARE)})",
            lambda f: f"{f.peak_after_recovery} at {f.peak_after_recovery_at:.2f} s",
        ),
        ("herd: total attempts", lambda f: str(f.attempts)),
        ("herd: successes", lambda f: str(f.successes)),
        ("herd: clients that gave up", lambda f: str(f.gave_up)),
        ("herd: last client finished", lambda f: f"{f.last_finished_s:.2f} s"),
    ]
    for status in spec.PERMANENT_STATUSES:
        rows.append((f"{status}: calls per client, time to fail", _permanent_cell(status)))
    rows += [
        ("ambiguous timeout: charges per client", lambda f: str(f.charges_per_client)),
        (
            f"429 with Retry-After {RETRY_AFTER_S:g} s: retried after",
            lambda f: "never" if f.retry_after_waited_s is None else f"{f.retry_after_waited_s:.2f} s",
        ),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(f) for f in figures.values()))
    return table


def _permanent_cell(status: int) -> Callable[[Figures], str]:
    return lambda f: f"{f.permanent[status][0]} in {f.permanent[status][1]:.1f} s"


def print_herd_plot(console: Console, figures: dict[str, Figures]) -> None:
    """Arrivals per 50 ms, one panel per side, stacked, on the same x and y scales so heights compare."""
    import plotext

    spec = load_spec()
    bucket_s = float(spec.BUCKET_S)
    top = max(max(f.buckets) for f in figures.values())
    right = max(len(f.buckets) for f in figures.values()) * bucket_s
    fig = plotext.figure
    fig.clear()
    fig.subplots(len(figures), 1)
    for row, (label, f) in enumerate(figures.items(), start=1):
        sub = fig.subplot(row, 1)
        sub.theme("colorless")  # the terminal's own colours, readable on dark and light alike
        limit = f.clients * float(spec.MAX_PEAK_SHARE)
        outage_s = float(spec.OUTAGE_S)
        sub.draw(sub.segment([outage_s, right], [limit, limit], marker="─"))
        sub.draw(sub.segment([outage_s, outage_s], [0.5, top], marker="│"))
        # Bars last, over the guides; every bucket is a bar so each is one bucket wide, and empty
        # buckets fall below the y range.
        sub.draw(sub.bar([i * bucket_s for i in range(len(f.buckets))], f.buckets, width=1))
        sub.title(f"{label}: arrivals per {bucket_s * 1000:g} ms · ─ limit after recovery · │ provider recovers")
        sub.ruler("y").lim(0.5, top)
        sub.ruler("y").ticks([1, limit, top], ["1", f"{limit:g}", str(top)])
        sub.ruler("x").lim(0, right)
        sub.ruler("x").ticks(ticks := [i * 0.5 for i in range(int(right / 0.5) + 1)], [f"{t:g} s" for t in ticks])
    fig.plot_size(min(console.width, 100), 16 * len(figures))
    console.print(Text.from_ansi(fig.build().string()))


def _require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise LabError("--plot needs matplotlib: pip install 'idempotency-lab[plot]' (or pip install matplotlib)")


def write_herd_png(path: str, figures: dict[str, Figures]) -> None:
    """The same panels as the terminal plot, as an image for slides."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    spec = load_spec()
    bucket_s, outage_s = float(spec.BUCKET_S), float(spec.OUTAGE_S)
    right = max(len(f.buckets) for f in figures.values()) * bucket_s
    fig, axes = plt.subplots(len(figures), 1, sharex=True, sharey=True, figsize=(10, 3.2 * len(figures)), squeeze=False)
    for ax, (label, f) in zip(axes[:, 0], figures.items(), strict=True):
        ax.bar([i * bucket_s for i in range(len(f.buckets))], f.buckets, width=bucket_s, align="edge")
        limit = f.clients * float(spec.MAX_PEAK_SHARE)
        ax.hlines(limit, outage_s, right, linestyles="--", colors="grey", label="limit after recovery")
        ax.axvspan(0, outage_s, color="red", alpha=0.08, label="provider answers 503")
        ax.set_title(f"{label}: arrivals per {bucket_s * 1000:g} ms")
        ax.set_xlim(0, right)
        ax.set_ylabel("arrivals")
        ax.legend(loc="upper right")
    axes[-1, 0].set_xlabel("virtual seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


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


async def herd_journey(console: Console, workspace: Workspace, info: ScenarioInfo, options: RunOptions) -> int:
    """`lab run 2`: the herd in virtual time (its own loops, so in a thread), then Brooker's table on Postgres."""
    code = await asyncio.to_thread(
        run_scenario_2, console, sides=options.sides, clients=options.clients, seed=options.seed, plot_path=options.plot
    )
    from lab.occ import ratio, run_occ_table

    console.print()
    rows = await run_occ_table(console, workspace.dsn, clients=(10, 25, 50))
    console.print(f"no jitter made {ratio(rows, 25):.1f}x the writes of full jitter at N=25", highlight=False)
    return code
