"""Wrong: Retry-After is honoured on a 429 only, since "Retry-After is the rate limiter's header".

The claim: "only throttling says when to come back". A 503 says it too (RFC 9110: how long the
service expects to be unavailable), and a client that returns before then meets the same outage,
adding to its load. Everything else is right. Expected verdict: exit 1, a 503's Retry-After.
"""

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import lab

T = TypeVar("T")


def retryable(err: Exception) -> bool:
    if isinstance(err, lab.ProviderError):
        return err.status >= 500 or err.status == 429
    return isinstance(err, TimeoutError)


async def call_with_retry(fn: Callable[..., Awaitable[T]], max_attempts: int = 6) -> T:
    key = str(uuid.UUID(int=random.getrandbits(128)))
    for attempt in range(max_attempts):
        try:
            return await fn(idempotency_key=key)
        except Exception as err:
            if attempt == max_attempts - 1 or not retryable(err):
                raise
            wait = random.uniform(0, min(30.0, 0.2 * 2**attempt))
            if isinstance(err, lab.ProviderError) and err.status == 429 and err.retry_after:
                wait += err.retry_after  # a 503's Retry-After is not read
            await asyncio.sleep(wait)
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
