"""Wrong: "retry everything that is not a 4xx", written as ``except BaseException``.

The claim: "a retry loop must not let anything slip through, not even a cancelled call". But a
cancellation is the caller giving up (its deadline passed, its user went away): catching it and
retrying keeps calling the provider for someone who no longer listens, and the caller's timeout
never fires on time. CancelledError must go through at once. Everything else is right (full
jitter, 5xx, 429 and timeouts, Retry-After, one key). Expected verdict: exit 1, cancellation.
"""

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import lab

T = TypeVar("T")


def final(err: BaseException) -> bool:
    return isinstance(err, lab.ProviderError) and 400 <= err.status < 500 and err.status != 429


async def call_with_retry(fn: Callable[..., Awaitable[T]], max_attempts: int = 6) -> T:
    key = str(uuid.UUID(int=random.getrandbits(128)))
    for attempt in range(max_attempts):
        try:
            return await fn(idempotency_key=key)
        except BaseException as err:  # asyncio.CancelledError too: retried as if the call had failed
            if attempt == max_attempts - 1 or final(err):
                raise
            wait = random.uniform(0, min(30.0, 0.2 * 2**attempt))
            if isinstance(err, lab.ProviderError) and err.retry_after:
                wait += err.retry_after
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                continue  # "cut the sleep short, try again now"
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
