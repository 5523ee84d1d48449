"""Wrong: full jitter and one key, but every ProviderError is still retried, 4xx included.

The claim: "jitter fixed the herd, so retrying is harmless now". Jitter spreads retries out; it
does not make a 400 or a 402 succeed. Both are sent six times and reach the caller seconds late.
Expected verdict: exit 1, the permanent-error attack.
"""

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import lab

T = TypeVar("T")


async def call_with_retry(fn: Callable[..., Awaitable[T]], max_attempts: int = 6) -> T:
    key = str(uuid.UUID(int=random.getrandbits(128)))
    for attempt in range(max_attempts):
        try:
            return await fn(idempotency_key=key)
        except (lab.ProviderError, TimeoutError) as err:  # every status, permanent or not
            if attempt == max_attempts - 1:
                raise
            wait = random.uniform(0, min(30.0, 0.2 * 2**attempt))
            if isinstance(err, lab.ProviderError) and err.retry_after:
                wait += err.retry_after
            await asyncio.sleep(wait)
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
