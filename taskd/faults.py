"""Crash points for tests: `TASKD_TEST_CRASH_AT=<point>` makes the daemon die there.

A test names a point between two writes and checks that a crash there (kill -9: no
clean-up, nothing more written) loses and repeats nothing. Unset, this costs one compare.
"""

from __future__ import annotations

import os
import signal

_POINT = os.environ.get("TASKD_TEST_CRASH_AT")


def crash_point(name: str) -> None:
    """Die here, as kill -9 would, if the tests asked for this point."""
    if name == _POINT:
        os.kill(os.getpid(), signal.SIGKILL)
