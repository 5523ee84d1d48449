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
    needs_postgres: bool = True

    def module(self, side: str) -> ModuleType:
        """``side`` is "buggy" (scenarios/) or "fixed" (fixes/)."""
        package = "scenarios" if side == "buggy" else "fixes"
        return importlib.import_module(f"{package}.{self.slug}")


SCENARIOS: dict[int, ScenarioInfo] = {
    1: ScenarioInfo(
        1, "s1_dedup_race", "Dedup race", "handle_charge",
        bug="SELECT, then INSERT with its error ignored: both requests charge",
        fix="one INSERT ... ON CONFLICT DO NOTHING RETURNING; only the winner charges",
        runner="lab.journey:charge_journey",
    ),
    2: ScenarioInfo(
        2, "s2_retry_herd", "Retry herd", "call_with_retry",
        bug="fixed doubling, no jitter, every error retried: synchronized spikes, permanent errors hammered",
        fix="full jitter, retry only 5xx/429/timeouts, honour Retry-After, one idempotency key per call",
        runner="lab.herd:herd_journey",
    ),
    3: ScenarioInfo(
        3, "s3_lost_transition", "Lost transition", "handle_charge",
        bug="a retry reads in_progress and calls the provider anyway; the last UPDATE to completed wins",
        fix="a live lease answers 409; every transition a compare-and-set on the owner's attempt; keyed provider",
        runner="lab.journey:charge_journey",
    ),
    4: ScenarioInfo(
        4, "s4_inbox_double_apply", "Inbox double-apply", "handle_event",
        bug="ON CONFLICT DO NOTHING, then an unconditional UPDATE: a redelivered event is applied again",
        fix="apply only when the dedup INSERT ... RETURNING gave a row, in the same transaction",
        runner="lab.inbox_journey:inbox_journey",
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
