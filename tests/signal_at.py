"""``python tests/signal_at.py MODULE:QUALNAME[:after][@N] LAB-ARGS...``: ``lab``, sent SIGTERM when a function is
first called (or, with ``:after``, as its first call returns; with ``@N``, its N-th call).

A signal at a precise point, every time: the windows a random moment (make soak) hits once in hundreds of tries.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from typing import Any


def main() -> int:
    where, argv = sys.argv[1], sys.argv[2:]
    where, _, nth = where.partition("@")
    calls_before = int(nth or 1) - 1
    module, _, qualname = where.partition(":")
    qualname, _, when = qualname.partition(":")
    owner: Any = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    sent: list[bool] = []

    @functools.wraps(original)
    def signalled(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls_before
        if sent or calls_before:
            calls_before = max(calls_before - 1, 0)
            return original(*args, **kwargs)
        sent.append(True)
        if when == "after":
            result = original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would; the lab's handler runs before the return
            return result
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    setattr(owner, name, signalled)
    from lab import cli

    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
