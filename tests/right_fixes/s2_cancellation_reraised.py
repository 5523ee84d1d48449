"""Right: a loop that catches BaseException, but lets cancellation and exits through first.

Another design than the lab's fix: some code bases catch BaseException to log everything; that is
fine as long as asyncio.CancelledError (and KeyboardInterrupt, SystemExit) are re-raised at once,
before anything is retried. Retryable errors are listed by what they are (5xx, 429, timeouts), and
the sleep is full jitter with any Retry-After as a floor. Expected verdict: exit 0.
"""

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import lab

T = TypeVar("T")


async def call_with_retry(fn: Callable[..., Awaitable[T]], max_attempts: int = 6) -> T:
    key = uuid.UUID(int=random.getrandbits(128)).hex
    for attempt in range(max_attempts):
        try:
            return await fn(idempotency_key=key)
        except BaseException as err:
            if not isinstance(err, Exception):
                raise  # cancelled, interrupted, exiting: the caller decides, not this loop
            transient = isinstance(err, TimeoutError) or (
                isinstance(err, lab.ProviderError) and (err.status >= 500 or err.status == 429)
            )
            if not transient or attempt == max_attempts - 1:
                raise
            floor = err.retry_after if isinstance(err, lab.ProviderError) and err.retry_after else 0.0
            await asyncio.sleep(max(floor, random.uniform(0, min(30.0, 0.2 * 2**attempt))))
    raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
