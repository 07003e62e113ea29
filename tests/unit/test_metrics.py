"""taskd.metrics without a daemon: what the executor's hook counts, as a scrape shows it."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from taskd.executor import AttemptEnd
from taskd.metrics import DURATION_BUCKETS, Metrics
from taskd.models import Job

NOW = 1_000_000.0
DURATIONS = [0.0, 0.001, 0.005, 0.0050001, 0.01, 0.3, 1, 2.5, 7.25, 60, 899.9, 3600, 3600.5, 1e7]
ENDS: list[AttemptEnd] = ["succeeded", "failed", "retry", "cancelled"]


class _Store:
    async def counts(self) -> list[Any]:
        return []


def _created_removed(text: str) -> str:
    return re.sub(r"(?m)^(taskd_job_duration_seconds_created\{.*\}) .*$", r"\1", text)


async def test_attempt_durations_scrape_as_prometheus_clients_histogram_of_them() -> None:
    """The hook counts a duration without Histogram.observe's frames: a scrape shows what a
    Histogram that observed the same durations, in the same order, shows (bucket bounds,
    floats summed in order, series in the order first seen), after each of two scrapes."""
    clock = NOW
    metrics = Metrics(_Store(), clock=lambda: clock)  # type: ignore[arg-type]
    reference = Histogram(
        "taskd_job_duration_seconds",
        "How long attempts took, by task and outcome (succeeded, failed, retry: failed "
        "and to run again, cancelled)",
        ["task", "outcome"],
        buckets=DURATION_BUCKETS,
        registry=None,
    )
    for scrape in range(2):
        for n, duration in enumerate(DURATIONS * 3):
            task, end = f"t{(n + scrape) % 3}", ENDS[n % len(ENDS)]
            started = NOW - duration * (1 + scrape)
            clock = started + duration
            metrics.attempt_ended(Job(n, task, "running", "enqueue", NOW, NOW,
                                      started_at=started), end)  # fmt: skip
            reference.labels(task, end).observe(max(0.0, clock - started))
        metrics.attempt_ended(Job(0, "t0", "running", "enqueue", NOW, NOW, started_at=NOW), "lost")
        text = await metrics.render()
        registry = CollectorRegistry()
        registry.register(reference)
        expected = generate_latest(registry).decode()
        assert "taskd_job_duration_seconds_sum{" in expected
        ours = text[text.index("# HELP taskd_job_duration_seconds ") :]
        ours = ours[: ours.index("# HELP taskd_job_retries_total ")]
        assert _created_removed(ours) == _created_removed(expected)
