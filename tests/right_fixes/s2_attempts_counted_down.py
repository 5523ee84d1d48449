"""Right: a while loop counting attempts down, with the delay doubled and jittered as it goes.

Another design than the lab's fix: the window doubles after each failure (capped at 30 s) and the
sleep is drawn from all of it, which is full jitter written as a running delay. Errors that cannot go
away by waiting are raised at once; the last error is raised as it is once the attempts are spent.
Expected verdict: exit 0.
"""

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import lab

T = TypeVar("T")


async def call_with_retry(fn: Callable[..., Awaitable[T]], max_attempts: int = 6) -> T:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    key = f"{random.getrandbits(128):032x}"
    window, left = 0.2, max_attempts
    while True:
        left -= 1
        try:
            return await fn(idempotency_key=key)
        except lab.ProviderError as err:
            if left == 0 or (err.status < 500 and err.status != 429):
                raise
            await asyncio.sleep((err.retry_after or 0.0) + random.uniform(0, window))
        except TimeoutError:
            if left == 0:
                raise
            await asyncio.sleep(random.uniform(0, window))
        window = min(30.0, window * 2)
