"""Signed webhooks with real daemons: events delivered by the built-in task taskd:webhook
to a local HTTP server, signed, retried after a 500; the `tasks` filter; config errors."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from taskctl import enqueue_params
from taskd.models import Job
from tests.backends import Backend
from tests.support import FIXTURE_TASKS, Taskd, wait_for_clock, wait_until

SECRET = "s3cret-for-tests"


class Receiver:
    """A local HTTP server that records each POST and answers with the next status of
    `statuses` (the last one once they run out)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers.items()), body))
                status = receiver.statuses[min(len(receiver.received), len(statuses)) - 1]
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/taskd"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([500, 200])
    yield server
    server.close()


def webhook_config(url: str, events: str, tasks: str = "") -> str:
    return (
        '[task."taskd:webhook"]\nbackoff = 0.2\n\n'
        f'[[webhook]]\nurl = "{url}"\nevents = {events}\nsecret_file = "secret.txt"\n{tasks}'
    )


def test_a_failed_job_is_delivered_signed_and_retried_after_a_500(
    backend: Backend, receiver: Receiver
) -> None:
    config = webhook_config(receiver.url, '["job.failed", "job.succeeded"]', 'tasks = ["fa*"]')
    daemon = backend.daemon(config)
    (daemon.root / "secret.txt").write_text(SECRET + "\n")  # the line's end is not the secret's
    daemon.start()
    with daemon.client() as client:
        # echo's success is not the filter's: no delivery.
        echoed = client.enqueue("echo", {"n": 1}).job_id
        assert client.wait(echoed, timeout=30).status == "succeeded"
        failed = client.enqueue("fail", "x", max_attempts=1).job_id
        assert client.wait(failed, timeout=30).status == "failed"
        wait_until(lambda: len(receiver.received) >= 2, 30, "a delivery retried after a 500")
        (delivery,) = client.jobs(task="taskd:webhook")
        delivered = client.wait(delivery.id, timeout=30)
    assert delivered.status == "succeeded" and delivered.attempts == 2, delivered
    assert delivered.origin == "hook" and delivered.parent_id == failed
    (_, first_body), (headers, body) = receiver.received
    assert first_body == body  # the same bytes each attempt: signed once, in the store
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Taskd-Event"] == "job.failed"
    assert headers["X-Taskd-Delivery"] == str(delivery.id)
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Taskd-Signature"], f"sha256={expected}")
    event = json.loads(body)
    assert event["event"] == "job.failed"
    assert event["job"]["id"] == failed and event["job"]["task"] == "fail"
    assert event["job"]["status"] == "failed" and "boom: x" in event["job"]["error"]
    # The first attempt's 500 is the delivery's recorded error; it shows in taskctl jobs.
    listed = daemon.ctl("jobs", "--task", "taskd:webhook")
    assert listed.returncode == 0 and "taskd:webhook" in listed.stdout, listed
    shown = json.loads(daemon.ctl("--json", "job", str(delivery.id)).stdout)
    assert "answered 500" in json.dumps(shown["errors"]), shown
    assert daemon.stop() == 0


def test_a_cancelled_job_is_delivered_and_a_delivery_triggers_none(
    backend: Backend, short_tmp: Path
) -> None:
    server = Receiver([500])  # every attempt fails: a delivery's own failure must not loop
    try:
        config = webhook_config(server.url, '["job.cancelled", "job.failed"]')
        config = config.replace("backoff = 0.2", "backoff = 0.2\nmax_attempts = 2")
        daemon = backend.daemon(config)
        (daemon.root / "secret.txt").write_text(SECRET)
        daemon.start()
        with daemon.client() as client:
            waiting = client.enqueue("echo", {"n": 1}, delay=3600).job_id
            client.cancel(waiting)
            wait_until(lambda: len(server.received) >= 2, 30, "two attempts")
            (delivery,) = client.jobs(task="taskd:webhook")
            assert client.wait(delivery.id, timeout=30).status == "failed"
            assert [j.id for j in client.jobs(task="taskd:webhook")] == [delivery.id]
        event = json.loads(server.received[0][1])
        assert event["event"] == "job.cancelled" and event["job"]["id"] == waiting
        assert daemon.stop() == 0
    finally:
        server.close()


def test_a_delivery_survives_kill_9(backend: Backend) -> None:
    server = Receiver([500])
    try:
        config = webhook_config(server.url, '["job.failed"]').replace("0.2", "1")
        daemon = backend.daemon(config)
        (daemon.root / "secret.txt").write_text(SECRET)
        daemon.start()
        with daemon.client() as client:
            failed = client.enqueue("fail", "x", max_attempts=1).job_id
            wait_until(lambda: server.received, 30, "a first attempt")
        daemon.kill()
        server.statuses = [200]
        daemon = backend.daemon(config).start()
        wait_until(lambda: len(server.received) >= 2, 30, "a delivery after the restart")
        with daemon.client() as client:
            (delivery,) = client.jobs(task="taskd:webhook")
            assert client.wait(delivery.id, timeout=30).status == "succeeded"
        assert server.received[0][1] == server.received[-1][1]
        assert json.loads(server.received[-1][1])["job"]["id"] == failed
        assert daemon.stop() == 0
    finally:
        server.close()


def test_a_finished_batch_is_delivered(backend: Backend) -> None:
    server = Receiver([200])
    try:
        daemon = backend.daemon(webhook_config(server.url, '["batch.finished"]', 'tasks = ["e*"]'))
        (daemon.root / "secret.txt").write_text(SECRET)
        daemon.start()
        with daemon.client() as client:
            jobs = [enqueue_params("echo", {"n": n}) for n in range(3)]
            batch = client.enqueue_many(jobs, on_finish="echo").batch
            wait_until(lambda: server.received, 30, "the batch's delivery")
            (delivery,) = client.jobs(task="taskd:webhook")
            assert client.wait(delivery.id, timeout=30).status == "succeeded"
        headers, body = server.received[0]
        assert headers["X-Taskd-Event"] == "batch.finished"
        event = json.loads(body)
        assert event == {"event": "batch.finished", "batch": {"id": batch, "on_finish": "echo"}}
        assert daemon.stop() == 0
    finally:
        server.close()


EVERY_SECOND = '[[schedule]]\nid = "often"\ncron = "* * * * * *"\ntasks = "echo"\n\n'


def tick_of(job: Job) -> float:
    return dt.datetime.fromisoformat(job.payload["scheduled_time"]).timestamp()


def test_ticks_missed_while_taskd_was_down_are_delivered_once(backend: Backend) -> None:
    server = Receiver([200])
    try:
        # catch_up = "skip" (the default): the ticks that go by while taskd is down are not
        # run; one schedule.missed event tells of them.
        config = EVERY_SECOND + webhook_config(server.url, '["schedule.missed"]', 'tasks = ["e*"]')
        daemon = backend.daemon(config)
        (daemon.root / "secret.txt").write_text(SECRET)
        daemon.start()
        with daemon.client() as client:
            wait_until(lambda: client.jobs(task="echo"), 10, "a first tick")
        assert daemon.stop() == 0
        stopped_at = time.time()
        wait_for_clock(stopped_at + 4)  # at least three ticks go by while taskd is down
        restarted_at = time.time()
        daemon = backend.daemon(config).start()
        wait_until(lambda: server.received, 30, "the schedule.missed delivery")
        with daemon.client() as client:
            wait_until(lambda: len(client.jobs(task="echo", limit=1000)) >= 2, 10, "a tick")
            (delivery,) = client.jobs(task="taskd:webhook")
            assert client.wait(delivery.id, timeout=30).status == "succeeded"
            echoes = client.jobs(task="echo", limit=1000, payloads=True)
        assert daemon.stop() == 0
        (headers, body), *more = server.received
        assert not more, more  # once, however the restart went
        assert headers["X-Taskd-Event"] == "schedule.missed"
        expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Taskd-Signature"], f"sha256={expected}")
        event = json.loads(body)
        assert event["event"] == "schedule.missed", event
        missed = event["schedule"]
        before = max(tick_of(job) for job in echoes if job.created_at < restarted_at)
        after = min(tick_of(job) for job in echoes if job.created_at > restarted_at)
        # Every tick between the last fired before the stop and the first after the start.
        ticks = [before + n for n in range(1, round(after - before))]
        assert len(ticks) >= 3, (before, after)
        assert missed["id"] == "often" and missed["tasks"] == ["echo"]
        assert missed["count"] == len(ticks) and missed["count_exact"] is True, missed
        listed = [dt.datetime.fromisoformat(t).timestamp() for t in missed["missed"]]
        assert listed == ticks, missed
        assert dt.datetime.fromisoformat(missed["last"]).timestamp() == ticks[-1]
        fired = missed["fired"]
        assert fired is None or dt.datetime.fromisoformat(fired).timestamp() == after, missed
    finally:
        server.close()


def test_a_reload_applies_webhooks_and_keeps_them_if_a_secret_is_missing(
    taskd_factory: type[Taskd], short_tmp: Path, receiver: Receiver
) -> None:
    receiver.statuses = [200]
    daemon = taskd_factory(short_tmp).start()
    (short_tmp / "secret.txt").write_text(SECRET)
    daemon.config_file.write_text(webhook_config(receiver.url, '["job.failed"]'))
    reloaded = daemon.ctl("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    (short_tmp / "secret.txt").unlink()
    refused = daemon.ctl("reload")
    assert refused.returncode != 0 and "cannot read secret_file" in refused.stderr, refused
    with daemon.client() as client:
        failed = client.enqueue("fail", "x", max_attempts=1).job_id
        wait_until(lambda: receiver.received, 30, "a delivery after the reload")
        (delivery,) = client.jobs(task="taskd:webhook")
        assert client.wait(delivery.id, timeout=30).status == "succeeded"
    headers, body = receiver.received[0]
    assert json.loads(body)["job"]["id"] == failed
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Taskd-Signature"] == f"sha256={expected}"  # the secret read at reload
    assert daemon.stop() == 0


def check(root: Path, config: str, secret: bool = True) -> subprocess.CompletedProcess[str]:
    (root / "taskd.toml").write_text(config)
    if secret:
        (root / "secret.txt").write_text(SECRET)
    command = [sys.executable, "-m", "taskd", "--config", str(root / "taskd.toml"), "--tasks",
               str(FIXTURE_TASKS), "--database", str(root / "t.db"), "--check"]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("url", "events", "secret", "words"),
    [
        ("ftp://example.com/x", '["job.failed"]', True,
         ["[[webhook]] number 1", "only http:// and https://"]),
        ("https://example.com/x", '["job.faild"]', True,
         ["[[webhook]] number 1", "unknown event 'job.faild'", 'did you mean "job.failed"']),
        ("https://example.com/x", '["job.failed"]', False,
         ["[[webhook]] number 1", "cannot read secret_file", "secret.txt"]),
    ],
)  # fmt: skip
def test_webhook_config_errors(
    short_tmp: Path, url: str, events: str, secret: bool, words: list[str]
) -> None:
    done = check(short_tmp, webhook_config(url, events), secret)
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_one_url_in_two_tables_is_refused(short_tmp: Path) -> None:
    table = webhook_config("https://example.com/x", '["job.failed"]')
    twice = table + table[table.index("[[webhook]]") :]
    done = check(short_tmp, twice)
    assert done.returncode != 0 and "[[webhook]] number 2" in done.stderr, done.stderr
    assert "already in an earlier [[webhook]]" in done.stderr


@pytest.mark.parametrize("events", ['["batch.finished"]', '["schedule.missed"]'])
def test_a_good_webhook_config_passes_the_check(short_tmp: Path, events: str) -> None:
    done = check(short_tmp, webhook_config("https://example.com/x", events))
    assert done.returncode == 0, done.stderr
