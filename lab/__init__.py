"""Idempotency Lab: idempotency and retry bugs reproduced on demand against a real PostgreSQL.

This module is the workshop API: the names a scenario, a fix or a learner's handler uses.
"""

from lab.attacks.charge import CrashAttack
from lab.attacks.invariants import (
    answered_as_stored,
    at_most_one_charge_per_key,
    at_most_one_provider_call_per_key,
    called_once_and_answered_as_stored,
    charged_once_after_recovery,
    reserved_is_sum_of_distinct_events,
)
from lab.attacks.provider import Provider
from lab.contracts import Event, ProviderError, RejectedEvent, Response
from lab.engine import clock
from lab.engine.proxy import SessionDb as Db
from lab.engine.scheduler import Crash, ScheduleError
from lab.engine.schedules import Schedule
from lab.errors import LabError

__all__ = [
    "Crash",
    "CrashAttack",
    "Db",
    "Event",
    "LabError",
    "Provider",
    "ProviderError",
    "RejectedEvent",
    "Response",
    "Schedule",
    "ScheduleError",
    "answered_as_stored",
    "at_most_one_charge_per_key",
    "at_most_one_provider_call_per_key",
    "called_once_and_answered_as_stored",
    "charged_once_after_recovery",
    "clock",
    "reserved_is_sum_of_distinct_events",
]
