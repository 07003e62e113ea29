"""The HTTP API against a real taskd, with a real HTTP client (http.client, raw sockets)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.http_support import (
    READONLY_TOKEN,
    TOKEN,
    HttpClient,
    Response,
    http_config,
    http_stats,
)
from tests.support import Taskd, wait_until

SCHEDULES = """
[scheduled_tasks]
"0 0 1 1 *" = ["echo", "slow"]

[[schedule]]
id = "nightly"
cron = "30 2 * * *"
tasks = ["work"]
"""


@pytest.fixture
def daemon(taskd_factory: type[Taskd]) -> Taskd:
    """A taskd with schedules and [http] on a TCP port of the loopback."""
    return taskd_factory(config=SCHEDULES + http_config()).start()


@pytest.fixture
def api(daemon: Taskd) -> HttpClient:
    return HttpClient.of(daemon)


def test_the_list_is_in_nitros_exact_shape(api: HttpClient, daemon: Taskd) -> None:
    reply = api.get("/_nitro/tasks")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    listed = reply.json()
    assert list(listed) == ["tasks", "scheduledTasks"]
    tasks = json.loads(daemon.ctl("--json", "list").stdout)
    assert listed["tasks"] == {task["name"]: {"description": task["description"]} for task in tasks}
    assert listed["tasks"]["echo"] == {"description": "Return the payload"}
    assert listed["scheduledTasks"] == [
        {"cron": "0 0 1 1 *", "tasks": ["echo", "slow"]},
        {"cron": "30 2 * * *", "tasks": ["work"]},
    ]
    assert api.get("/tasks").json() == listed  # the alias


def test_run_with_query_parameters_and_with_a_body(api: HttpClient) -> None:
    # GET: the query is the payload; a repeated key is a list.
    reply = api.get("/_nitro/tasks/echo?name=Ada&tag=a&tag=b&empty=")
    assert reply.status == 200
    assert reply.json() == {"result": {"name": "Ada", "tag": ["a", "b"], "empty": ""}}
    # POST: the body's payload over the query parameters, its keys winning.
    body = {"payload": {"name": "Bob", "n": [1, 2.5, None], "deep": {"ok": True}}}
    reply = api.post("/_nitro/tasks/echo?name=Ada&x=1", body)
    assert reply.json() == {
        "result": {"name": "Bob", "x": "1", "n": [1, 2.5, None], "deep": {"ok": True}}
    }
    assert reply.headers["taskd-joined"] == "false" and int(reply.headers["taskd-job-id"]) > 0
    # No payload at all is {}, as in Nitro; the short path is an alias.
    assert api.post("/tasks/echo").json() == {"result": {}}
    assert api.get("/tasks/echo").json() == {"result": {}}
    assert api.post("/tasks/echo", {"payload": None}).json() == {"result": {}}
    # A task name with a colon, percent-encoded or not.
    assert api.get("/tasks/nested%3Adeep%3Asend-it").status == 200
    assert api.get("/tasks/nested:deep:send-it").status == 200


def test_a_run_over_http_and_one_from_taskctl_share_one_execution(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon = taskd_factory(config=http_config()).start()
    api = HttpClient.of(daemon)
    started, record = short_tmp / "started", short_tmp / "record"
    payload = {"seconds": 1.0, "started": str(started), "record": str(record)}
    replies: list[Response] = []
    http_run = threading.Thread(
        target=lambda: replies.append(api.post("/_nitro/tasks/slow", {"payload": payload}))
    )
    http_run.start()
    wait_until(lambda: started.exists() and started.read_text(), what="the slow task to start")
    ran = daemon.ctl("--json", "run", "slow", "--payload", '{"other": "payload"}')
    http_run.join(60)
    assert ran.returncode == 0, ran.stderr
    assert "joined job" in ran.stderr
    (reply,) = replies
    assert reply.status == 200 and reply.json() == {"result": payload}
    assert json.loads(ran.stdout)["id"] == int(reply.headers["taskd-job-id"])
    assert json.loads(ran.stdout)["result"] == payload
    assert len(record.read_text().splitlines()) == 1  # the task executed once


def test_each_error_has_its_status_and_code(api: HttpClient) -> None:
    def check(reply: Response, status: int, code: str, *words: str) -> None:
        assert reply.status == status, reply
        assert reply.error["code"] == code
        for word in words:
            assert word in reply.error["message"], reply.error

    check(api.get("/_nitro/tasks/nope"), 404, "unknown_task", "'nope'", "known tasks")
    check(api.post("/tasks/email", {"payload": {"to": 5}}), 422, "payload_invalid", "$.to")
    failed = api.get("/tasks/fail?why=because")
    check(failed, 500, "job_failed", "boom", "failed after 1 attempt")
    assert failed.error["data"]["status"] == "failed"
    check(api.get("/jobs/999999"), 404, "unknown_job", "999999")
    done = int(api.post("/tasks/echo").headers["taskd-job-id"])
    check(api.post(f"/jobs/{done}/cancel"), 409, "conflict")
    check(api.post(f"/jobs/{done}/retry"), 409, "conflict")
    check(api.post("/jobs", b"{not json"), 400, "bad_request", "not valid JSON")
    check(api.post("/jobs", {"task": "echo", "dealy": 5}), 400, "invalid_params", "dealy")
    check(api.post("/jobs", {"task": "echo", "delay": -1}), 400, "invalid_params",
          "delay: at least 0 seconds, got -1 seconds")  # fmt: skip
    check(api.post("/jobs"), 400, "invalid_params", "JSON object")
    check(api.post("/tasks/echo", {"paylod": {}}), 400, "invalid_params", "paylod")
    check(api.post("/tasks/echo", {"payload": [1]}), 400, "invalid_params", "$.payload")
    check(api.get("/jobs?limit=0"), 400, "invalid_params", "$.limit")
    check(api.get("/jobs?limit=1&limit=2"), 400, "invalid_params", "twice")
    check(api.get("/jobs?status=lost"), 400, "invalid_params", "status")
    check(api.get("/jobs/x"), 400, "invalid_params", "$.id")
    check(api.get("/jobs/99999999999999999999"), 400, "invalid_params", "$.id")
    check(api.request("DELETE", "/jobs"), 405, "method_not_allowed", "GET")
    check(api.get("/nowhere"), 404, "not_found", "/openapi.json")


def test_the_queue_over_http(api: HttpClient) -> None:
    later = {"task": "echo", "payload": {"n": 1}, "delay": 3600, "key": "k"}
    created = api.post("/jobs", later)
    assert created.status == 201 and created.json() == {
        "job_id": created.json()["job_id"],
        "duplicate": False,
    }
    job_id = created.json()["job_id"]
    assert created.headers["location"] == f"/jobs/{job_id}"
    again = api.post("/jobs", later)
    assert again.status == 200 and again.json() == {"job_id": job_id, "duplicate": True}
    job = api.get(f"/jobs/{job_id}").json()
    assert (job["status"], job["payload"], job["key"], job["errors"]) == (
        "pending",
        {"n": 1},
        "k",
        [],
    )
    listed = api.get("/jobs?status=pending&task=echo").json()["jobs"]
    assert [j["id"] for j in listed] == [job_id] and listed[0]["payload"] is None
    with_payloads = api.get("/jobs?status=pending,failed&payloads=true").json()["jobs"]
    assert with_payloads[0]["payload"] == {"n": 1}
    cancelled = api.post(f"/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    retried = api.post(f"/jobs/{job_id}/retry").json()
    assert retried["status"] == "pending" and retried["attempts"] == 0
    assert api.post("/jobs", {"task": "echo"}).status == 201  # no payload: {}


def test_an_enqueue_takes_delays_and_times_in_taskctls_forms(api: HttpClient) -> None:
    before = time.time()
    in_five = api.post("/jobs", {"task": "echo", "delay": "5m"})
    assert in_five.status == 201, in_five.body
    due = api.get(f"/jobs/{in_five.json()['job_id']}").json()["run_at"]
    assert before + 300 <= due <= time.time() + 300
    at = api.post("/jobs", {"task": "echo", "run_at": "2030-01-01T08:00:00+01:00"})
    assert at.status == 201, at.body
    due = api.get(f"/jobs/{at.json()['job_id']}").json()["run_at"]
    assert due == dt.datetime(2030, 1, 1, 7, tzinfo=dt.UTC).timestamp()
    for body, said in (
        ({"delay": "soon"}, "delay: invalid duration 'soon'"),
        ({"run_at": "tomorrow"}, "is not an ISO-8601 time"),
        ({"run_at": "2030-01-01T08:00:00"}, "has no offset"),
    ):
        refused = api.post("/jobs", {"task": "echo", **body})
        assert refused.status == 400 and refused.error["code"] == "invalid_params", refused.body
        assert said in refused.error["message"]


REPORT_TASK = """
import msgspec
from taskd import define_task


class Report(msgspec.Struct, forbid_unknown_fields=True):
    sections: int
    draft: bool = False
    tags: list[str] = []
    title: str = "daily"


@define_task
async def daily(payload: Report) -> dict:
    return msgspec.structs.asdict(payload)
"""


def test_query_values_take_the_types_of_the_payloads_fields(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    (short_tmp / "tasks" / "reports").mkdir(parents=True)
    (short_tmp / "tasks" / "reports" / "daily.py").write_text(REPORT_TASK)
    api = HttpClient.of(taskd_factory(tasks=short_tmp / "tasks", config=http_config()).start())
    reply = api.get("/_nitro/tasks/reports:daily?sections=2&draft=true&tags=a&tags=b&title=7")
    assert reply.status == 200, reply.body
    assert reply.json() == {
        "result": {"sections": 2, "draft": True, "tags": ["a", "b"], "title": "7"}
    }
    # The body's values are JSON's, typed already, and win over the query's.
    reply = api.post("/_nitro/tasks/reports:daily?sections=2", {"payload": {"sections": 3}})
    assert reply.status == 200 and reply.json()["result"]["sections"] == 3, reply.body
    wrong = api.get("/_nitro/tasks/reports:daily?sections=two")
    assert wrong.status == 422 and wrong.error["code"] == "payload_invalid", wrong.body
    assert "sections" in wrong.error["message"]


def test_tokens_are_required_and_read_only_ones_cannot_change_anything(api: HttpClient) -> None:
    missing = api.get("/_nitro/tasks", token=None)
    assert missing.status == 401 and missing.error["code"] == "unauthorized"
    assert missing.headers["www-authenticate"] == 'Bearer realm="taskd"'
    wrong = api.get("/_nitro/tasks", token=TOKEN[:-1] + "X")
    assert wrong.status == 401 and "invalid_token" in wrong.headers["www-authenticate"]
    assert api.get("/jobs", headers={"Authorization": f"Basic {TOKEN}"}, token=None).status == 401
    assert api.get("/healthz", token=None).json() == {"status": "ok", "message": None}
    for path in ("/metrics", "/openapi.json", "/tasks/echo"):
        assert api.get(path, token=None).status == 401, path
    readonly = HttpClient(api.port, token=READONLY_TOKEN)
    assert readonly.get("/_nitro/tasks").status == 200
    assert readonly.get("/jobs").status == 200
    assert readonly.get("/metrics").status == 200
    for method, path, body in [
        ("GET", "/_nitro/tasks/echo", None),
        ("POST", "/tasks/echo", None),
        ("POST", "/jobs", {"task": "echo"}),
        ("POST", "/jobs/1/cancel", None),
        ("POST", "/jobs/1/retry", None),
    ]:
        refused = readonly.request(method, path, body)
        assert refused.status == 403, (method, path)
        assert (
            refused.error["code"] == "permission_denied" and "read-only" in refused.error["message"]
        )
    assert api.get("/jobs").json()["jobs"] == []  # nothing ran or was enqueued


def test_a_tcp_listener_without_a_token_is_refused(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=http_config(tokens=False))
    with pytest.raises(AssertionError, match="exited with 78"):
        daemon.start()
    assert "is a TCP address, which every user of this machine can reach" in daemon.log
    checked = subprocess.run(
        [*daemon.command(), "--check"], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 78 and "set tokens" in checked.stderr


def test_a_body_too_large_gets_413_and_the_daemon_keeps_serving(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory(config=http_config(max_body_size=2048)).start()
    api = HttpClient.of(daemon)
    body = json.dumps({"task": "echo", "payload": "x" * 100_000})
    refused = api.post("/jobs", body)
    assert refused.status == 413 and refused.error["code"] == "body_too_large"
    assert "2048" in refused.error["message"] and refused.headers["connection"] == "close"
    # Chunked, with no length announced: counted as it arrives.
    connection = api.connection()
    connection.putrequest("POST", "/jobs")
    connection.putheader("Authorization", f"Bearer {TOKEN}")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    for _ in range(4):
        connection.send(b"400\r\n" + b"x" * 1024 + b"\r\n")
    reply = connection.getresponse()
    assert reply.status == 413
    connection.close()
    assert api.post("/jobs", {"task": "echo", "payload": "small"}).status == 201
    payload = {"y": "y" * 1500}
    assert api.post("/tasks/echo", {"payload": payload}).json() == {"result": payload}


def test_oversized_headers_and_garbage_get_an_error_and_a_close(api: HttpClient) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400 ")
    assert api.get("/healthz").status == 200


def read_all(sock: socket.socket) -> bytes:
    """Everything until taskd closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_clients_do_not_stall_the_others_and_are_cut_off(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=http_config(read_timeout="2s")).start()
    api = HttpClient.of(daemon)
    slow: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:  # slowloris: a header byte now and then, never the end of the head
        while not stop.is_set():
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"a")
            stop.wait(0.1)

    for _ in range(10):
        sock = socket.create_connection(("127.0.0.1", api.port), timeout=30)
        sock.sendall(b"GET /jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(sock)
    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        for _ in range(20):  # others are served meanwhile, and so is the control socket
            assert api.get("/_nitro/tasks").status == 200
        assert daemon.ctl("status").returncode == 0
        for sock in slow:  # cut off after read_timeout, with 408, however busy they are
            assert read_all(sock).startswith(b"HTTP/1.1 408 ")
    finally:
        stop.set()
        trickler.join()
        for sock in slow:
            sock.close()
    # A client that never reads its responses does not hold anything up either.
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as greedy:
        request = f"GET /openapi.json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        greedy.sendall(request.encode() * 200)
        assert api.get("/healthz").status == 200


def wait_until_closed(sock: socket.socket) -> None:
    """Until taskd closes the connection, reading what it sends; TimeoutError if it does not."""
    with contextlib.suppress(ConnectionResetError):
        read_all(sock)


def test_callers_with_a_token_have_half_the_connections_and_idle_ones_make_room(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    """max_connections = 2: one for connections with a token, one for the others."""
    config = 'grace_period = "1s"\n' + http_config(max_connections=2)
    daemon = taskd_factory(config=config).start()
    api = HttpClient.of(daemon)
    idle = socket.create_connection(("127.0.0.1", api.port), timeout=30)
    idle.sendall(f"GET /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")  # then kept alive, idle
    started = short_tmp / "started"
    run = threading.Thread(
        target=lambda: api.post(
            "/tasks/slow", {"payload": {"seconds": 60, "started": str(started)}}
        )
    )
    run.start()  # its connection takes the idle one's place
    wait_until_closed(idle)
    idle.close()
    wait_until(started.exists, what="the slow task to start")
    busy = api.get("/_nitro/tasks")
    assert busy.status == 503 and busy.error["code"] == "busy"
    assert busy.headers["retry-after"] == "1" and "max_connections" in busy.error["message"]
    assert api.get("/healthz").status == 200  # no token: the other half
    assert api.get("/healthz", token=TOKEN).status == 200  # served on either footing
    stats = http_stats(daemon)
    assert (stats["open"], stats["authenticated"], stats["max_connections"]) == (1, 1, 2)
    assert (stats["refused_busy"], stats["closed_idle"]) == (1, 1)
    shown = daemon.ctl("status").stdout
    assert "http:      1 open (1 with a token); at most 2, 1 of them without one" in shown
    assert "refused 0 without a token for newer ones, 0 slower than 5s to send a head, 1 " in shown
    assert "refused an HTTP connection from 127.0.0.1:" in daemon.log
    assert "all 1 connections with a token are busy" in daemon.log
    assert daemon.stop() == 0
    run.join(60)


def test_a_request_head_has_header_timeout_and_its_body_read_timeout(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory(config=http_config(header_timeout="1s", read_timeout="60s")).start()
    api = HttpClient.of(daemon)
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as slow:
        slow.sendall(b"GET /jobs HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        answer = read_all(slow)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"(header_timeout)" in answer
    body = json.dumps({"task": "echo", "payload": {"n": 1}}).encode()
    head = (
        f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as patient:
        patient.sendall(head.encode() + body[:5])
        time.sleep(1.5)  # past header_timeout: the body has read_timeout
        patient.sendall(body[5:])
        assert patient.recv(65536).startswith(b"HTTP/1.1 201 ")
    stats = http_stats(daemon)
    assert stats["refused_header_timeout"] == 1 and stats["header_timeout"] == 1.0
    assert "did not arrive within 1s (header_timeout)" in daemon.log


def test_an_idle_connection_is_closed_after_keepalive_timeout(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=http_config(keepalive_timeout="1s")).start()
    api = HttpClient.of(daemon)
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as silent:
        started = time.monotonic()
        wait_until_closed(silent)  # it never sent a byte
        assert time.monotonic() - started >= 1.0
    connection = api.connection()
    connection.request("GET", "/healthz")
    assert connection.getresponse().read()
    assert connection.sock is not None
    wait_until_closed(connection.sock)  # kept alive, then idle
    connection.close()
    assert http_stats(daemon)["closed_idle"] == 2


def test_the_body_of_a_request_without_a_token_is_not_read(api: HttpClient) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        answer = read_all(sock)  # without a byte of the body
    assert answer.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in answer
    assert api.get("/healthz").status == 200


def test_a_unix_socket_needs_no_token_and_is_private(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    path = short_tmp / "http" / "http.sock"
    daemon = taskd_factory(config=http_config(f"unix:{path}", tokens=False)).start()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    api = HttpClient(unix=path, token=None)
    assert api.get("/tasks/echo?via=unix").json() == {"result": {"via": "unix"}}
    assert api.get("/metrics").status == 200
    assert daemon.stop() == 0
    assert not path.exists()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as nobody")
def test_a_unix_socket_applies_the_access_rules_of_the_control_socket(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    short_tmp.chmod(0o755)
    path = short_tmp / "http" / "http.sock"
    http = http_config(f"unix:{path}", tokens=False)
    shared = 'socket_group = "nogroup"\nreadonly_users = ["nobody"]\n'
    daemon = taskd_factory(config=shared + http).start()
    assert stat.S_IMODE(path.stat().st_mode) == 0o660

    def as_nobody(method: str, target: str) -> tuple[int, dict[str, Any]]:
        code = (
            "import http.client, json, socket, sys\n"
            "c = http.client.HTTPConnection('localhost')\n"
            "c.sock = socket.socket(socket.AF_UNIX); c.sock.connect(sys.argv[1])\n"
            "c.request(sys.argv[2], sys.argv[3]); r = c.getresponse()\n"
            "print(json.dumps([r.status, json.loads(r.read())]))\n"
        )
        done = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             sys.executable, "-c", code, str(path), method, target],
            capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        status, body = json.loads(done.stdout)
        return status, body

    assert as_nobody("GET", "/jobs")[0] == 200  # read-only: may look
    status, body = as_nobody("POST", "/tasks/echo")
    assert status == 403 and body["error"]["code"] == "permission_denied"
    assert daemon.stop() == 0
    taskd_factory(config='socket_group = "nogroup"\n' + http).start()  # nobody is not let in
    status, body = as_nobody("GET", "/jobs")
    assert status == 403 and "may not use this taskd" in body["error"]["message"]


def test_a_run_in_progress_is_answered_when_taskd_stops(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon = taskd_factory(config='grace_period = "1s"\n' + http_config()).start()
    api = HttpClient.of(daemon)
    started = short_tmp / "started"
    replies: list[Response] = []
    payload = {"seconds": 60, "started": str(started)}
    run = threading.Thread(
        target=lambda: replies.append(api.post("/tasks/slow", {"payload": payload}))
    )
    run.start()
    wait_until(started.exists, what="the slow task to start")
    assert daemon.stop() == 0
    run.join(60)
    (reply,) = replies
    assert reply.status == 503 and reply.error["code"] == "shutting_down"


def test_tokens_from_a_file_are_read_again_at_a_reload(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    tokens = short_tmp / "tokens"
    old, new = "old-token-" + "a" * 20, "new-token-" + "b" * 20
    tokens.write_text(f"# tokens for the HTTP API\n{old}\nreadonly {READONLY_TOKEN}\n")
    tokens.chmod(0o640)
    config = http_config(tokens=False, tokens_file=str(tokens))
    daemon = taskd_factory(config=config).start()
    api = HttpClient.of(daemon, token=old)
    assert api.get("/tasks/echo").status == 200
    assert api.get("/tasks/echo", token=READONLY_TOKEN).status == 403
    tokens.write_text(f"{new}\n")
    assert daemon.ctl("reload").returncode == 0
    assert api.get("/jobs").status == 401
    assert api.get("/tasks/echo", token=new).status == 200
    tokens.chmod(0o644)  # readable by everyone: refused, and the old tokens stay
    reload = daemon.ctl("reload")
    assert reload.returncode == 78 and "chmod o-rwx" in reload.stderr
    assert api.get("/jobs", token=new).status == 200
