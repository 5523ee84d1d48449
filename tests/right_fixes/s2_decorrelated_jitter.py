"""Right: Brooker's "decorrelated jitter" instead of full jitter.

Another design than the lab's fix: each sleep is drawn from [base, 3 x the previous sleep], capped,
so consecutive sleeps are random but grow ("Exponential Backoff And Jitter", AWS Architecture
Blog). It spreads the herd as well as full jitter; only 5xx, 429 and timeouts are retried, the
provider's Retry-After is waited out, and every attempt carries the call's one key. Expected
verdict: exit 0.
"""

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import lab

T = TypeVar("T")

BASE_S, CAP_S = 0.2, 30.0


def retryable(err: Exception) -> bool:
    if isinstance(err, lab.ProviderError):
        return err.status >= 500 or err.status == 429
    return isinstance(err, TimeoutError)


async def call_with_retry(fn: Callable[..., Awaitable[T]], max_attempts: int = 6) -> T:
    key = str(uuid.UUID(int=random.getrandbits(128)))
    sleep = BASE_S
    for attempt in range(max_attempts):
        try:
            return await fn(idempotency_key=key)
        except Exception as err:
            if attempt == max_attempts - 1 or not retryable(err):
                raise
            sleep = min(CAP_S, random.uniform(BASE_S, sleep * 3))
            asked = err.retry_after if isinstance(err, lab.ProviderError) else None
            await asyncio.sleep(sleep + (asked or 0.0))
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
