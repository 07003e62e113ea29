"""`taskctl metrics` and `GET /metrics`: the Prometheus exposition, read by prometheus-client's
own parser, after jobs ran, failed, retried, waited and ticked."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.http_support import HttpClient, http_config
from tests.support import Taskd, wait_until

CONFIG = """
workers = 1

[[schedule]]
id = "slow-tick"
cron = "0 0 1 1 *"
tasks = ["slow"]

[[schedule]]
id = "every-second"
cron = "* * * * * *"
tasks = ["blocking"]  # sleeps 0.2 s in a thread
"""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def scrape(daemon: Taskd) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    done = daemon.ctl("metrics")
    assert done.returncode == 0, done.stderr
    return samples(done.stdout)


def test_taskctl_metrics_after_jobs_ran(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    daemon = taskd_factory(config=CONFIG + http_config()).start()
    started = short_tmp / "started"
    release = short_tmp / "release"
    os.mkfifo(release)
    # The one worker is busy with a slow run, until the test releases it; a tick of the
    # same task joins it (coalesced), and an enqueued job waits for the worker.
    slow = daemon.ctl("run", "slow", "--detach", "--payload", json.dumps(
        {"seconds": 0, "started": str(started), "until": str(release)}
    ))  # fmt: skip
    wait_until(started.exists, what="the slow run to start")
    assert daemon.ctl("schedules", "trigger", "slow-tick").returncode == 0
    waiting = daemon.ctl("enqueue", "echo").stdout.strip()
    during = scrape(daemon)
    assert value(during, "taskd_jobs", task="slow", status="running") == 1
    assert value(during, "taskd_queue_depth", task="echo") == 1
    assert value(during, "taskd_oldest_pending_age_seconds", task="echo") > 0
    release.write_bytes(b"go")
    assert daemon.ctl("wait", slow.stdout.strip()).returncode == 0
    assert daemon.ctl("wait", waiting).returncode == 0
    # Runs that succeed, one that fails, one that fails once and is retried.
    for _ in range(2):
        assert daemon.ctl("run", "echo").returncode == 0
    assert daemon.ctl("run", "fail").returncode == 1
    flaky = daemon.ctl("run", "flaky", "--max-attempts", "2", "--payload", json.dumps(
        {"log": str(short_tmp / "flaky.log"), "succeed_on": 2}
    ))  # fmt: skip
    assert flaky.returncode == 0, flaky.stderr
    wait_until(
        lambda: value(scrape(daemon), "taskd_schedule_tick_lateness_seconds_count",
                      schedule="every-second") >= 2,
        what="two ticks of the every-second schedule",
    )  # fmt: skip
    # A running job cancelled: its attempt ends as cancelled.
    again = short_tmp / "started-again"
    slow = daemon.ctl("run", "slow", "--detach", "--payload", json.dumps(
        {"seconds": 30, "started": str(again)}
    ))  # fmt: skip
    wait_until(again.exists, what="the second slow run to start")
    assert daemon.ctl("cancel", slow.stdout.strip()).returncode == 0
    wait_until(
        lambda: value(scrape(daemon), "taskd_job_duration_seconds_count",
                      task="slow", outcome="cancelled") == 1,
        what="the cancelled attempt to be counted",
    )  # fmt: skip
    after = scrape(daemon)
    duration = "taskd_job_duration_seconds_count"
    assert value(after, duration, task="echo", outcome="succeeded") == 3
    assert value(after, duration, task="fail", outcome="failed") == 1
    assert value(after, duration, task="flaky", outcome="retry") == 1
    assert value(after, duration, task="flaky", outcome="succeeded") == 1
    assert value(after, duration, task="slow", outcome="succeeded") == 1
    assert value(after, "taskd_job_retries_total", task="flaky") == 1
    assert value(after, "taskd_job_retries_total", task="echo") == 0
    assert value(after, "taskd_jobs", task="echo", status="succeeded") == 3
    assert value(after, "taskd_jobs", task="fail", status="failed") == 1
    assert value(after, "taskd_queue_depth", task="echo") == 0
    assert value(after, "taskd_schedule_ticks_total", schedule="slow-tick") == 1
    assert value(after, "taskd_schedule_coalesced_ticks_total", schedule="slow-tick") == 1
    assert value(after, "taskd_schedule_ticks_total", schedule="every-second") >= 2
    buckets = {
        dict(labels)["le"]: count
        for (name, labels), count in after.items()
        if name == "taskd_schedule_tick_lateness_seconds_bucket"
        and dict(labels)["schedule"] == "every-second"
    }
    assert buckets["+Inf"] >= 2 and buckets["60.0"] == buckets["+Inf"]  # on time, not minutes
    # The same exposition over HTTP, with the text format's content type.
    reply = HttpClient.of(daemon).get("/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert value(samples(reply.body.decode()), duration, task="fail", outcome="failed") == 1
    as_json = daemon.ctl("--json", "metrics")
    assert json.loads(as_json.stdout).startswith("# HELP")
