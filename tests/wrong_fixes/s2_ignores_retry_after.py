"""Wrong: full jitter, the right errors, one key, but the provider's Retry-After is ignored.

The claim: "full jitter already backs off". From 0.2 s; the provider said 2 s. A throttled client
that comes back early is throttled again, and counts against the limit it was asked to respect.
Expected verdict: exit 1, the 429 is retried before Retry-After.
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
            await asyncio.sleep(random.uniform(0, min(30.0, 0.2 * 2**attempt)))  # Retry-After: not read
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
