"""Wrong: full jitter, the right errors retried, but a fresh idempotency key on every attempt.

The claim: "every request must carry an idempotency key". Every *request*, yes: a retry is the same
request, so it must carry the same key. With a new one, a charge whose response was lost is made
again by the retry. Expected verdict: exit 1, the ambiguous-timeout attack charges twice.
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
    for attempt in range(max_attempts):
        key = str(uuid.UUID(int=random.getrandbits(128)))  # a new key makes the retry a new purchase
        try:
            return await fn(idempotency_key=key)
        except Exception as err:
            if attempt == max_attempts - 1 or not retryable(err):
                raise
            wait = random.uniform(0, min(30.0, 0.2 * 2**attempt))
            if isinstance(err, lab.ProviderError) and err.retry_after:
                wait += err.retry_after
            await asyncio.sleep(wait)
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
