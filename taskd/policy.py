"""Retry policy: how many attempts a job gets and how long it waits between them (pure)."""

from __future__ import annotations

import math

DEFAULT_BACKOFF = 60.0  # seconds before the 2nd attempt; then 2 min, 4 min, ...
DEFAULT_MAX_BACKOFF = 3600.0
JITTER = 0.1  # up to 10% added at random, so that failed jobs do not retry in lockstep
DEFAULT_QUEUE_ATTEMPTS = 3  # enqueued jobs
DEFAULT_RUN_ATTEMPTS = 1  # runs and cron ticks: the caller sees the failure at once


def backoff_delay(attempt: int, base: float, cap: float, random_fraction: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    `base * 2**(attempt-1)`, capped at `cap`, plus up to `JITTER` of that at random
    (`random_fraction` in [0, 1)). The cap applies before the jitter.
    """
    delay = min(math.ldexp(base, min(attempt - 1, 62)), cap)
    return delay + delay * JITTER * random_fraction


def default_attempts(single_flight: bool, task_max_attempts: int | None) -> int:
    """Attempts a job gets unless its caller says: the task's setting, else 1 for a run
    (whose caller waits for the outcome) and 3 for an enqueued job."""
    if task_max_attempts is not None:
        return task_max_attempts
    return DEFAULT_RUN_ATTEMPTS if single_flight else DEFAULT_QUEUE_ATTEMPTS
