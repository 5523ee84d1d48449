"""Scenario 2, fixed: full jitter, only errors that can go away are retried, one key per request.

Claim: clients that fail together must not retry together, and a retry that cannot help is not made.

Expected outcome under the same attacks (100 clients, provider down for its first second):
  * once the provider has recovered, no 50 ms bucket sees more than a fifth of the clients: each
    sleep is drawn uniformly from [0, min(cap, base * 2**attempt)] ("full jitter": Marc Brooker,
    "Exponential Backoff And Jitter", AWS Architecture Blog), so the herd spreads out;
  * 402 and 400 fail after one call, at once: only 5xx, 429 and timeouts are retried, and a
    Retry-After from the provider is waited out before the jitter is added;
  * a charge whose response timed out is charged once: every attempt carries the same idempotency
    key, so the provider answers the retry with the first charge instead of making a second.

Contract with ``fn``: it is the request, as an async callable taking an optional keyword
``idempotency_key``. Here the wrapper mints one key per call and passes it on every attempt, so all
attempts are one request to the provider; it raises ``lab.ProviderError(status)`` or ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import lab

T = TypeVar("T")

BASE_S = 0.2  # first delay, as in the snippet (200 ms)
CAP_S = 30.0  # longest delay


def retryable(err: Exception) -> bool:
    """Only a server's trouble (5xx), throttling (429) or silence (timeout) can go away by itself."""
    if isinstance(err, lab.ProviderError):
        return err.status >= 500 or err.status == 429
    return isinstance(err, TimeoutError)


async def call_with_retry(fn: Callable[..., Awaitable[T]], max_attempts: int = 6) -> T:
    key = f"{random.getrandbits(128):032x}"  # one key for the request, sent with every attempt
    for attempt in range(max_attempts):
        try:
            return await fn(idempotency_key=key)
        except Exception as err:  # 4xx other than 429 is the final answer
            if attempt == max_attempts - 1 or not retryable(err):
                raise
            delay = random.uniform(0, min(CAP_S, BASE_S * 2**attempt))  # full jitter
            if isinstance(err, lab.ProviderError) and err.retry_after:
                delay += err.retry_after  # the provider said when; the jitter still spreads the return
            await asyncio.sleep(delay)
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")  # nothing was tried


# The attacks, annotated like an isolation spec. One line per client; all start at t = 0.
#
# herd: provider answers 503 until OUTAGE_S, then 200
#   C1..CN  0.0 s      503                N arrivals in one bucket (the first wave, unavoidable)
#   C1..CN  0.0-0.2 s  503  <spread>      the first retries share four buckets instead of one
#   C1..CN  0.2-1.0 s  503  <spread>      each wave is wider and thinner than the last
#   C1..CN  1.0-3.7 s  200  <spread>      the recovered provider sees at most N/5 per bucket
#                                         (seed 1: peak 10 of 100, everyone done by 3.7 s;
#                                         about 1 in 100 draws six short sleeps and gives up)
CLIENTS = 100  # N: clients that fail together
OUTAGE_S = 1.0  # the provider answers 503 for its first second
BUCKET_S = 0.05  # arrivals are counted per 50 ms
#
# permanent: provider answers 402, then (second run) 400, to every call
#   C1  0.0 s  402  <raises at once>                              (the answer never changes)
PERMANENT_STATUSES = (402, 400)
#
# ambiguous timeout: provider charges, then the first response is lost; the client times out
#   C1  0.0 s      charge ch_1 (key k1)  <... TimeoutError after CLIENT_TIMEOUT_S>
#   C1  1.0-1.2 s  replay ch_1 (key k1)  200                      one charge for one purchase
CLIENT_TIMEOUT_S = 1.0
#
# The invariant, read from the provider's record of arrivals and charges, never from the handler:
MAX_PEAK_SHARE = 1 / 5  # after recovery, no 50 ms bucket sees more than a fifth of the clients
MAX_CALLS_ON_PERMANENT = 1  # a 4xx other than 429 is final: one call, no waiting
MAX_CHARGES_PER_CLIENT = 1  # a retry is the same request: same key, so the provider charges once
