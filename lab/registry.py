"""The one place where lab/ names the scenarios: everything else asks the registry.

A scenario's buggy module lives in ``scenarios/<slug>.py`` and its fix in ``fixes/<slug>.py``; the
``runner`` is the lab function that plays its journey (``module:function``, imported lazily so that
``lab list`` stays instant).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from lab.errors import LabError


@dataclass(frozen=True)
class ScenarioInfo:
    number: int
    slug: str
    title: str
    contract: str  # the function a handler module must define
    bug: str
    fix: str
    runner: str
    run_flags: frozenset[str] = frozenset()  # the `lab run` options its journey honours (see RUN_FLAGS)
    max_sessions: int = 0  # the most sessions --sessions may explore exhaustively (0: it explores none)
    needs_postgres: bool = True

    @property
    def isolation(self) -> bool:
        """Its sessions run transactions: `lab run N --isolation` and `lab matrix` apply."""
        return "isolation" in self.run_flags

    def module(self, side: str) -> ModuleType:
        """``side`` is "buggy" (scenarios/) or "fixed" (fixes/)."""
        package = "scenarios" if side == "buggy" else "fixes"
        return importlib.import_module(f"{package}.{self.slug}")


#: Every option of `lab run` that a scenario may or may not honour (the keys are argparse's names for
#: them). A scenario's ``run_flags`` name those its journey does what the flag says for; any other is
#: refused with one line, so no flag is ever silently ignored.
RUN_FLAGS = {
    "buggy": "--buggy", "fixed": "--fixed", "explore": "--explore", "stress": "--stress", "crash": "--crash",
    "sessions": "--sessions", "trials": "--trials", "concurrency": "--concurrency", "latency_ms": "--latency-ms",
    "step_timeout": "--step-timeout", "isolation": "--isolation", "clients": "--clients", "seed": "--seed",
    "plot": "--plot", "no_reduction": "--no-reduction",
}  # fmt: skip
_SIDES = frozenset({"buggy", "fixed"})
_CHARGE = _SIDES | {
    "explore", "stress", "sessions", "trials", "concurrency", "latency_ms", "step_timeout", "isolation", "no_reduction",
}

SCENARIOS: dict[int, ScenarioInfo] = {
    1: ScenarioInfo(
        1, "s1_dedup_race", "Dedup race", "handle_charge",
        bug="SELECT, then INSERT with its error ignored: both requests charge",
        fix="one INSERT ... ON CONFLICT DO NOTHING RETURNING; only the winner charges",
        runner="lab.journeys.charge:charge_journey",
        run_flags=_CHARGE,
        max_sessions=4,
    ),
    2: ScenarioInfo(
        2, "s2_retry_herd", "Retry herd", "call_with_retry",
        bug="fixed doubling, no jitter, every error retried: synchronized spikes, permanent errors hammered",
        fix="full jitter, retry only 5xx/429/timeouts, honour Retry-After, one idempotency key per call",
        runner="lab.journeys.herd:herd_journey",
        # The retry loop runs in virtual time: no session, no transaction, no interleaving to explore.
        run_flags=_SIDES | {"clients", "seed", "plot"},
    ),
    3: ScenarioInfo(
        3, "s3_lost_transition", "Lost transition", "handle_charge",
        bug="a retry reads in_progress and calls the provider anyway; the last UPDATE to completed wins",
        fix="a live lease answers 409; every transition a compare-and-set on the owner's attempt; keyed provider",
        runner="lab.journeys.charge:charge_journey",
        run_flags=_CHARGE | {"crash"},  # its module names a CRASH attack: the original crashes, the client retries
        max_sessions=3,
    ),
    4: ScenarioInfo(
        4, "s4_inbox_double_apply", "Inbox double-apply", "handle_event",
        bug="ON CONFLICT DO NOTHING, then an unconditional UPDATE: a redelivered event is applied again",
        fix="apply only when the dedup INSERT ... RETURNING gave a row, in the same transaction",
        runner="lab.journeys.inbox:inbox_journey",
        # Its stress is a stream of events (its seed, not trials or concurrency), without simulated latency.
        run_flags=_SIDES | {
            "explore", "crash", "stress", "sessions", "step_timeout", "isolation", "seed", "no_reduction",
        },
        max_sessions=3,
    ),
}


def scenario(number: str | int) -> ScenarioInfo:
    """Look a scenario up by number (``1``) or slug (``s1_dedup_race``); a clear error otherwise."""
    for info in SCENARIOS.values():
        if str(number) in (str(info.number), info.slug, f"s{info.number}"):
            return info
    known = ", ".join(f"{i.number} ({i.slug})" for i in SCENARIOS.values())
    raise LabError(f"unknown scenario {number!r}; known scenarios: {known}")


def runner(info: ScenarioInfo) -> object:
    module_name, function = info.runner.split(":")
    return getattr(importlib.import_module(module_name), function)
