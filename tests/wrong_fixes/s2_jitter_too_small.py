"""Wrong: jitter of plus or minus 10% on the doubling delay.

The claim: "a little randomness desynchronises the clients". Ten per cent of 0.2 s is 20 ms, less
than one 50 ms bucket: clients that failed together still come back together, a little blurred,
and the recovered provider meets nearly the whole herd at once. Full jitter draws from [0, delay].
Everything else is right. Expected verdict: exit 1, the herd attack.
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
    delay = 0.2
    for attempt in range(max_attempts):
        try:
            return await fn(idempotency_key=key)
        except Exception as err:
            if attempt == max_attempts - 1 or not retryable(err):
                raise
            wait = delay * random.uniform(0.9, 1.1)  # too little to spread a herd
            if isinstance(err, lab.ProviderError) and err.retry_after:
                wait += err.retry_after
            await asyncio.sleep(wait)
            delay = min(30.0, delay * 2)
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
