"""Scenario 2, the retry herd: a faithful port of snippet 2, fixed doubling and every error retried.

Claim: clients that fail together retry together, and a retry that cannot help is still made.

Expected broken outcome (100 clients, provider down for its first second; see ``lab/attacks/herd.py``):
  * all 100 retries land in the same 50 ms bucket at 0.2, 0.6 and 1.4 s: the outage that caused
    the failures is hit again by the full load, three times over, and again when it recovers;
  * a card declined (402) or a bad request (400) is sent 6 times over 6.2 s before the caller hears;
  * a charge whose response timed out is charged again on every retry, because each attempt is a
    new request with a new idempotency key.

Contract with ``fn``: it is the request, as an async callable taking an optional keyword
``idempotency_key``. Called without one (as here), the client builds a new request each time and
mints a fresh key, as a naive client does; it raises ``lab.ProviderError(status)`` or ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

BASE_S = 0.2  # first delay, as in the snippet (200 ms)
CAP_S = 30.0  # longest delay


async def call_with_retry(fn: Callable[..., Awaitable[T]], max_attempts: int = 6) -> T:
    delay = BASE_S
    for attempt in range(max_attempts):
        try:
            return await fn()
        except Exception:  # every error, permanent or not, is retried
            if attempt == max_attempts - 1:
                raise
            await asyncio.sleep(delay)  # fixed doubling, no randomness
            delay = min(CAP_S, delay * 2)
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")  # nothing was tried


# The attacks, annotated like an isolation spec. One line per client; all start at t = 0.
#
# herd: provider answers 503 until OUTAGE_S, then 200
#   C1..CN  0.0 s  503                    N arrivals in one bucket (the first wave, unavoidable)
#   C1..CN  0.2 s  503  <all N again>     the retry lands on the outage it is waiting out
#   C1..CN  0.6 s  503  <all N again>
#   C1..CN  1.4 s  200  <all N again>     the recovered provider meets the full herd at once
CLIENTS = 100  # N: clients that fail together
OUTAGE_S = 1.0  # the provider answers 503 for its first second
BUCKET_S = 0.05  # arrivals are counted per 50 ms
#
# permanent: provider answers 402, then (second run) 400, to every call
#   C1  0.0 0.2 0.6 1.4 3.0 6.2 s  402 x6  <raises after 6.2 s>   (the answer never changes)
PERMANENT_STATUSES = (402, 400)
#
# ambiguous timeout: provider charges, then the first response is lost; the client times out
#   C1  0.0 s  charge ch_1 (key k1)  <... TimeoutError after CLIENT_TIMEOUT_S>
#   C1  1.2 s  charge ch_2 (key k2)  200                          two charges for one purchase
CLIENT_TIMEOUT_S = 1.0
#
# The invariant, read from the provider's record of arrivals and charges, never from the handler:
MAX_PEAK_SHARE = 1 / 5  # after recovery, no 50 ms bucket sees more than a fifth of the clients
MAX_CALLS_ON_PERMANENT = 1  # a 4xx other than 429 is final: one call, no waiting
MAX_CHARGES_PER_CLIENT = 1  # a retry is the same request: same key, so the provider charges once
