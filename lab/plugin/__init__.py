"""The pytest plugin: the lab's attacks on a user's own handler, from their own tests.

``hooks`` is what pytest loads (the ``pytest11`` entry point): fixtures and report hooks, light to
import. ``fixture`` is the ``lab`` object a test gets, ``report`` what a failing or passing test says.
"""

from lab.plugin.hooks import InvariantBroken, NotProven

__all__ = ["InvariantBroken", "NotProven"]
