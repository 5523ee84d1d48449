"""Wrong: a retry budget of its own, six attempts, whatever the caller passed as max_attempts.

The claim: "six is what the snippet did, and the parameter is only there for its signature". A
caller that asks for 3 attempts (a checkout with a tight deadline) gets 6, and one that asks for 10
(a batch job) gets 6. max_attempts is the number of calls. Everything else is right. Expected
verdict: exit 1, max_attempts.
"""

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import lab

T = TypeVar("T")
ATTEMPTS = 6


def retryable(err: Exception) -> bool:
    if isinstance(err, lab.ProviderError):
        return err.status >= 500 or err.status == 429
    return isinstance(err, TimeoutError)


async def call_with_retry(fn: Callable[..., Awaitable[T]], max_attempts: int = 6) -> T:
    key = str(uuid.UUID(int=random.getrandbits(128)))
    for attempt in range(ATTEMPTS):  # the parameter is never read
        try:
            return await fn(idempotency_key=key)
        except Exception as err:
            if attempt == ATTEMPTS - 1 or not retryable(err):
                raise
            wait = random.uniform(0, min(30.0, 0.2 * 2**attempt))
            if isinstance(err, lab.ProviderError) and err.retry_after:
                wait += err.retry_after
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")
