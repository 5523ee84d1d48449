"""Right: 408 and 409 are retried too, as "try again later", and the final error is raised from a summary.

Another design than the lab's fix: 408 (the server timed the request out) and 409 (an idempotent
API's "a request with this key is in flight") both mean "come back later", and the contract lets a
wrapper treat them either way. When it gives up it raises its own RetriesExhausted *from* the last
error, so the caller still reaches the provider's answer (``__cause__``). Full jitter on top of any
Retry-After, one key for every attempt, and a cancellation goes straight through. Expected
verdict: exit 0.
"""

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import lab

T = TypeVar("T")
LATER = {408, 409, 429}


class RetriesExhausted(Exception):
    """Every attempt failed; the last error is the cause."""


def retryable(err: Exception) -> bool:
    if isinstance(err, lab.ProviderError):
        return err.status >= 500 or err.status in LATER
    return isinstance(err, TimeoutError)


async def call_with_retry(fn: Callable[..., Awaitable[T]], max_attempts: int = 6) -> T:
    key = str(uuid.UUID(int=random.getrandbits(128)))
    for attempt in range(max_attempts):
        try:
            return await fn(idempotency_key=key)
        except Exception as err:
            if not retryable(err):
                raise
            if attempt == max_attempts - 1:
                raise RetriesExhausted(f"{max_attempts} attempts failed") from err
            asked = err.retry_after if isinstance(err, lab.ProviderError) and err.retry_after else 0.0
            await asyncio.sleep(asked + random.uniform(0, min(30.0, 0.2 * 2**attempt)))
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
