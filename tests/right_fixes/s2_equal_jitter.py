"""Right: "equal jitter": half the doubling delay fixed, half drawn at random.

Another design than the lab's fix: the sleep is d/2 + uniform(0, d/2) for d = base x 2^attempt, so
no client comes back sooner than half the delay, yet clients that failed together spread over half
of it. Only 5xx, 429 and timeouts are retried, Retry-After is waited out, one key per call.
Expected verdict: exit 0.
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
            delay = min(30.0, 0.2 * 2**attempt)
            wait = delay / 2 + random.uniform(0, delay / 2)
            if isinstance(err, lab.ProviderError) and err.retry_after:
                wait = max(wait, err.retry_after)
            await asyncio.sleep(wait)
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
