"""Wrong: only the gateway errors (502, 503, 504) are retried, "a 500 is a bug on their side".

The claim: "a 500 will not go away by retrying, it is the provider's bug". Maybe, but the contract
(and the provider) says otherwise: a 5xx is the server's trouble, and an internal error is exactly
what goes away on another node, a moment later. Retrying only 502-504 turns every 500 and 507 into a
failed payment. Everything else is right. Expected verdict: exit 1, every 5xx is retried.
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
        return err.status in (429, 502, 503, 504)
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
