"""Wrong: "only retry what might go away", with 402 on the list of things that might.

The claim: "a declined card can succeed a moment later (insufficient funds, a fraud check)". Not
without the customer doing something: the provider's answer will not change, and six 402s over six
seconds only delay the one the customer needed to see. Everything else is right (full jitter, one
key, Retry-After). Expected verdict: exit 1, the 402 is sent more than once.
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
        return err.status >= 500 or err.status in (402, 429)  # 402 does not go away by waiting
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
            if isinstance(err, lab.ProviderError) and err.retry_after:
                wait += err.retry_after
            await asyncio.sleep(wait)
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
