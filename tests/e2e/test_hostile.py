"""Every byte on the control socket is untrusted: each kind of bad input gets a clear error or
a clean disconnect, memory stays bounded, and the daemon goes on serving everyone else."""

from __future__ import annotations

import shutil
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from tests.support import (
    RawConnection,
    Taskd,
    frame,
    hello_after_refusal,
    rss_kib,
    short_tempdir,
    wait_until,
)

MAX_FRAME = 65536
READ_TIMEOUT = 0.5
MAX_CONNECTIONS = 50
CONFIG = f"""
max_frame_size = {MAX_FRAME}
read_timeout = "{READ_TIMEOUT}s"
max_connections = {MAX_CONNECTIONS}
"""

encode = msgspec.msgpack.encode


@pytest.fixture(scope="module")
def daemon() -> Iterator[Taskd]:
    """One daemon for the whole module: what one test throws at it must not hurt the next."""
    root = short_tempdir()
    running = Taskd(root, config=CONFIG, log_level="info").start()
    yield running
    assert running.stop() == 0, running.log
    assert "Traceback" not in running.log, running.log
    shutil.rmtree(root, ignore_errors=True)


def request(method: Any, params: bytes = b"\x80", request_id: bytes = b"\x07") -> bytes:
    """A request body built by hand, so that any part of it can be wrong."""
    method_bytes = method if isinstance(method, bytes) else encode(method)
    return b"\x83\xa2id" + request_id + b"\xa6method" + method_bytes + b"\xa6params" + params


def nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]


def run_params(payload: bytes, task: bytes = b"\xa4echo") -> bytes:
    return b"\x82\xa4task" + task + b"\xa7payload" + payload


TASK = b"\xa4task\xa4echo"  # "task": "echo"
ITEM = b"\x81" + TASK  # {"task": "echo"}: an item of enqueue_many


# (body, error code or "result", the reply's id, a fragment of the message). The fragments
# are taskd's own words, or the name of the field at fault, never a dependency's wording.
CASES: dict[str, tuple[bytes, str, int | None, str]] = {
    "empty frame": (b"", "bad_frame", None, "not a request"),
    "not msgpack": (b"\xc1\xc1\xc1", "bad_frame", None, "not a request"),
    "truncated msgpack": (request("jobs")[:-3], "bad_frame", None, "not a request"),
    "trailing bytes": (request("jobs") + b"\x00", "bad_frame", 7, "not a valid request"),
    "a list, not a map": (encode([1, "jobs", {}]), "bad_frame", None, "not a request"),
    "a bare string": (encode("jobs"), "bad_frame", None, "not a request"),
    "id is a string": (request("jobs", request_id=b"\xa1x"), "bad_frame", None, "not a request"),
    "method is missing": (b"\x81\xa2id\x01", "bad_frame", 1, "not a valid request"),
    "unknown top-level key": (
        encode({"id": 7, "method": "jobs", "params": {}, "junk": 1}),
        "bad_frame",
        7,
        "junk",
    ),
    "params nil": (encode({"id": 7, "method": "jobs", "params": None}), "result", 7, ""),
    "params absent": (encode({"id": 7, "method": "jobs"}), "result", 7, ""),
    "second hello": (request("hello", encode({"protocol": 1})), "result", 7, ""),
    "unknown method": (request("explode"), "unknown_method", 7, "unknown method 'explode'"),
    "params is a list": (request("jobs", encode([1])), "invalid_params", 7, "params for jobs"),
    "params of the wrong type": (
        request("job", encode({"id": "x"})),
        "invalid_params",
        7,
        "params for job",
    ),
    "unknown param": (request("status", encode({"verbose": 1})), "invalid_params", 7, "verbose"),
    "nested 60000 deep": (nested(60_000), "bad_frame", None, "not a request"),
    "params nested 5000 deep": (request("jobs", nested(5000)), "invalid_params", 7, "too deep"),
    "payload nested 5000 deep": (
        request("run", run_params(nested(5000))),
        "payload_invalid",
        7,
        "too deep",
    ),
    "payload nested 500 deep is fine": (request("run", run_params(nested(500))), "result", 7, ""),
    "method not UTF-8": (request(b"\xa2\xff\xfe"), "bad_frame", 7, "not a valid request"),
    "task not UTF-8": (
        request("run", run_params(b"\xc0", b"\xa2\xc3\x28")),
        "invalid_params",
        7,
        "`$.task` is not valid UTF-8",
    ),
    "payload not UTF-8": (
        request("run", run_params(b"\xa2\xff\xfe")),
        "payload_invalid",
        7,
        "not valid msgpack",
    ),
    "key not UTF-8": (
        request("enqueue", b"\x82\xa4task\xa4echo\xa3key\xa1\xff"),
        "invalid_params",
        7,
        "invalid params for enqueue: `$.key` is not valid UTF-8",
    ),
    "key not UTF-8 after a payload not UTF-8": (
        request("run", b"\x83\xa4task\xa4echo\xa7payload\xa2\xff\xfe\xa3key\xa1\xff"),
        "invalid_params",
        7,
        "`$.key` is not valid UTF-8",
    ),
    "a key of params not UTF-8": (
        request("jobs", b"\x81\xa1\xff\x01"),
        "invalid_params",
        7,
        "a key of `$` is not valid UTF-8",
    ),
    "enqueue_many key not UTF-8": (
        request("enqueue_many", b"\x81\xa4jobs\x92" + ITEM + b"\x82" + TASK + b"\xa3key\xa1\xff"),
        "invalid_params",
        7,
        "`$.jobs[1].key` is not valid UTF-8",
    ),
    "key nested 5000 deep": (
        request("enqueue", b"\x82" + TASK + b"\xa3key" + nested(5000)),
        "invalid_params",
        7,
        "invalid params for enqueue: `$.key` is nested too deeply",
    ),
    "enqueue_many key nested 5000 deep": (
        request(
            "enqueue_many", b"\x81\xa4jobs\x92" + ITEM + b"\x82" + TASK + b"\xa3key" + nested(5000)
        ),
        "invalid_params",
        7,
        "`$.jobs[1].key` is nested too deeply",
    ),
    "enqueue_many payload nested 5000 deep": (
        request(
            "enqueue_many",
            b"\x81\xa4jobs\x92" + ITEM + b"\x82" + TASK + b"\xa7payload" + nested(5000),
        ),
        "payload_invalid",
        7,
        "jobs[1]: the payload is nested too deeply",
    ),
    "request id 2**64-1": (request("jobs", request_id=b"\xcf" + b"\xff" * 8), "result", None, ""),
    "job id 2**64-1": (
        request("job", encode({"id": 2**64 - 1})),
        "invalid_params",
        7,
        "params for job",
    ),
    "job id -2**63": (request("job", encode({"id": -(2**63)})), "unknown_job", 7, "no job with id"),
    "priority 2**64-1": (
        request("enqueue", encode({"task": "echo", "priority": 2**64 - 1})),
        "invalid_params",
        7,
        "priority",
    ),
    "max_attempts 2**63": (
        request("run", encode({"task": "echo", "max_attempts": 2**63})),
        "invalid_params",
        7,
        "max_attempts",
    ),
    "max_attempts 0": (
        request("enqueue", encode({"task": "echo", "max_attempts": 0})),
        "invalid_params",
        7,
        "max_attempts",
    ),
    "cancel 2**64-1": (
        request("cancel", encode({"id": 2**64 - 1})),
        "invalid_params",
        7,
        "params for cancel",
    ),
    "payload with 2**64-1": (request("run", run_params(b"\xcf" + b"\xff" * 8)), "result", 7, ""),
    "wait timeout NaN": (
        request("wait", encode({"id": 1, "timeout": float("nan")})),
        "invalid_params",
        7,
        "timeout",
    ),
    "wait timeout infinite": (
        request("wait", encode({"id": 1, "timeout": float("inf")})),
        "invalid_params",
        7,
        "timeout",
    ),
    "delay infinite": (
        request("enqueue", encode({"task": "echo", "delay": float("inf")})),
        "invalid_params",
        7,
        "delay",
    ),
    "run_at infinite": (
        request("enqueue", encode({"task": "echo", "run_at": float("inf")})),
        "invalid_params",
        7,
        "run_at",
    ),
    "delay and run_at": (
        request("enqueue", encode({"task": "echo", "delay": 5.0, "run_at": 2e9})),
        "invalid_params",
        7,
        "not both",
    ),
    "reserved key": (
        request("enqueue", encode({"task": "echo", "key": "@run"})),
        "invalid_params",
        7,
        "reserved",
    ),
    "empty key": (request("run", encode({"task": "echo", "key": ""})), "invalid_params", 7, "key"),
    "key too long": (
        request("enqueue", encode({"task": "echo", "key": "k" * 1025})),
        "invalid_params",
        7,
        "key",
    ),
    "limit 0": (request("jobs", encode({"limit": 0})), "invalid_params", 7, "limit"),
    "payload over a quarter of max_frame_size": (
        request("run", run_params(encode("x" * (MAX_FRAME // 4)))),
        "payload_invalid",
        7,
        f"over the limit of {MAX_FRAME // 4}",
    ),
    "params with a map as a key": (
        request("jobs", b"\x81\x81\xa1a\x01\x02"),  # {{"a": 1}: 2}
        "invalid_params",
        7,
        "jobs",
    ),
    "prune NaN": (
        request("prune", encode({"older_than": float("nan")})),
        "invalid_params",
        7,
        "older_than",
    ),
    "prune infinite": (
        request("prune", encode({"older_than": float("inf")})),
        "invalid_params",
        7,
        "older_than",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_requests_get_a_clear_error_and_the_connection_goes_on(
    daemon: Taskd, case: str
) -> None:
    body, expected, request_id, fragment = CASES[case]
    with RawConnection(daemon.socket) as connection:
        connection.sock.sendall(frame(body))
        reply = connection.reply()
        if request_id is not None:
            assert reply["id"] == request_id, reply
        if expected == "result":
            assert "result" in reply, reply
        else:
            assert reply["id"] == request_id, reply
            assert reply["error"]["code"] == expected, reply
            assert fragment in reply["error"]["message"], reply
        # The frame boundaries held: the same connection answers the next request.
        assert connection.call("jobs", {"limit": 1})["id"] > 1


def test_a_batch_item_nested_too_deeply_is_named_by_its_index(daemon: Taskd) -> None:
    body = CASES["enqueue_many payload nested 5000 deep"][0]
    with RawConnection(daemon.socket) as connection:
        connection.sock.sendall(frame(body))
        error = connection.reply()["error"]
    assert error["code"] == "payload_invalid" and error["data"] == {"index": 1}
    assert error["message"].startswith("jobs[1]: ")


@pytest.mark.parametrize("depth", [900, 950, 990, 1000, 1100])
def test_a_deep_payload_is_refused_under_its_request_id(daemon: Taskd, depth: int) -> None:
    """Near the decoder's depth limit a payload decodes or is refused, under its own id."""
    with RawConnection(daemon.socket) as connection:
        connection.sock.sendall(frame(request("run", run_params(nested(depth)))))
        reply = connection.reply()
        assert reply["id"] == 7, reply
        assert "result" in reply or reply["error"]["code"] == "payload_invalid", reply


def test_frames_over_the_limit_are_refused_and_the_connection_closed(daemon: Taskd) -> None:
    with RawConnection(daemon.socket) as connection:
        connection.sock.sendall(frame(b"\x00" * (MAX_FRAME + 1)))
        reply = connection.reply()
        assert reply["error"]["code"] == "frame_too_large" and reply["id"] is None
        assert f"over the limit of {MAX_FRAME}" in reply["error"]["message"]
        assert connection.closed_by_taskd()
    with RawConnection(daemon.socket) as connection:
        connection.sock.sendall(struct.pack(">I", 0xFFFFFFFF))  # announces 4 GiB, sends nothing
        assert connection.reply()["error"]["code"] == "frame_too_large"
        assert connection.closed_by_taskd()
    with RawConnection(daemon.socket, hello=False) as connection:
        connection.sock.sendall(struct.pack(">I", 100_000))  # before hello: 64 KiB at most
        error = connection.reply()["error"]
        assert error["code"] == "frame_too_large" and "before hello" in error["message"]
        assert connection.closed_by_taskd()


@pytest.mark.parametrize("sent", [b"\x00\x00", struct.pack(">I", 100) + b"x" * 10])
def test_a_client_that_stalls_mid_frame_is_cut_off(daemon: Taskd, sent: bytes) -> None:
    with RawConnection(daemon.socket) as connection:
        time.sleep(READ_TIMEOUT * 1.5)  # idle between requests is fine, however long
        assert connection.call("jobs", {"limit": 1})["id"] == 2
        connection.sock.sendall(sent)  # half a header, or a tenth of a body
        started = time.monotonic()
        error = connection.reply()["error"]
        waited = time.monotonic() - started
        assert error["code"] == "bad_frame" and "not completed within 0.5s" in error["message"]
        assert READ_TIMEOUT * 0.8 < waited < READ_TIMEOUT + 2.0
        assert connection.closed_by_taskd()


def test_a_client_that_never_says_hello_is_cut_off(daemon: Taskd) -> None:
    with RawConnection(daemon.socket, hello=False) as connection:
        error = connection.reply()["error"]
        assert error["code"] == "bad_frame" and "no hello within 0.5s" in error["message"]
        assert connection.closed_by_taskd()


def test_thousands_of_idle_connections(daemon: Taskd) -> None:
    assert daemon.process is not None
    before = rss_kib(daemon.process.pid)
    with RawConnection(daemon.socket) as keeper:  # greeted before the flood
        idle = []
        started = time.monotonic()
        for _ in range(2000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket))  # blocking: waits while the backlog is full
            sock.settimeout(10)
            idle.append(RawConnectionFromSocket(sock))
        flooded_for = time.monotonic() - started
        # The daemon keeps serving the connections it has while the flood goes on.
        assert "result" in keeper.call("status")
        codes: dict[str, int] = {}
        for connection in idle:
            code = connection.reply()["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
            assert connection.closed_by_taskd()
            connection.sock.close()
        # At most max_connections were let in at once (the keeper holds one); they were
        # dropped after read_timeout without a hello, making room for as many more, as often
        # as read_timeout passed while the flood lasted (on a loaded machine, more than
        # once). The rest were told `busy` and closed at once.
        let_in = (MAX_CONNECTIONS - 1) * (1 + int(flooded_for / READ_TIMEOUT))
        assert codes.get("bad_frame", 0) <= let_in, flooded_for
        assert codes["busy"] >= 2000 - let_in
        assert sum(codes.values()) == 2000
        assert "result" in keeper.call("jobs", {"limit": 1})
    # And newcomers get in again.
    wait_until(lambda: daemon.ctl("list").returncode == 0, what="a new client to be served")
    assert rss_kib(daemon.process.pid) - before < 20 * 1024, "memory grew by over 20 MiB"


def test_a_connection_cannot_have_unbounded_requests_in_flight(daemon: Taskd) -> None:
    enqueued = daemon.ctl("enqueue", "echo", "--delay", "1h")
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = int(enqueued.stdout)
    with RawConnection(daemon.socket) as connection:
        waits = b"".join(connection.request("wait", {"id": job_id}) for _ in range(200))
        connection.sock.sendall(waits)  # 200 waits that will not end soon
        busy = [connection.reply() for _ in range(200 - 128)]
        assert all(reply["error"]["code"] == "busy" for reply in busy), busy[0]
        assert "128 requests in flight" in busy[0]["error"]["message"]
    assert daemon.ctl("cancel", str(job_id)).returncode == 0


class RawConnectionFromSocket(RawConnection):
    """A RawConnection around a socket that is already connected (and said nothing)."""

    def __init__(self, sock: socket.socket) -> None:  # no connect, no hello
        self.sock = sock
        self._next_id = 1


def test_a_busy_client_that_talks_first_still_reads_why(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config="max_connections = 1\n").start()
    with RawConnection(daemon.socket):  # takes the only place
        reply = hello_after_refusal(daemon.socket)
    assert reply["id"] is None and reply["error"]["code"] == "busy", reply
    assert daemon.ctl("list").returncode == 0


def test_a_result_over_the_limit_fails_the_job_and_every_job_fits_a_reply(daemon: Taskd) -> None:
    with RawConnection(daemon.socket) as connection:
        ran = connection.call("run", {"task": "big", "payload": {"bytes": MAX_FRAME // 4}})
        job = ran["result"]["job"]
        assert job["status"] == "failed" and f"over the limit of {MAX_FRAME // 4}" in job["error"]
        fits = connection.call("run", {"task": "big", "payload": {"bytes": MAX_FRAME // 4 - 16}})
        assert fits["result"]["job"]["status"] == "succeeded"
        # The largest payload and the largest result together still make a readable job.
        payload = {"bytes": MAX_FRAME // 4 - 16, "padding": "p" * (MAX_FRAME // 4 - 64)}
        done = connection.call("run", {"task": "big", "payload": payload})["result"]["job"]
        shown = connection.call("job", {"id": done["id"]})
        assert shown["result"]["payload"] == payload and len(shown["result"]["result"]) > 16000


def test_a_refused_batch_names_the_item(daemon: Taskd) -> None:
    jobs = [{"task": "echo"}, {"task": "echo", "max_attempts": 2}, {"task": "no-such-task"}]
    with RawConnection(daemon.socket) as connection:
        newest = connection.call("jobs", {"limit": 1})["result"]
        reply = connection.call("enqueue_many", {"jobs": jobs})
        error = reply["error"]
        assert error["code"] == "unknown_task" and error["message"].startswith("jobs[2]: ")
        assert error["data"] == {"task": "no-such-task", "index": 2}
        jobs[2] = {"task": "echo", "delay": 5.0, "run_at": 2e9}
        error = connection.call("enqueue_many", {"jobs": jobs})["error"]
        assert error["code"] == "invalid_params" and error["data"] == {"index": 2}
        assert connection.call("jobs", {"limit": 1})["result"] == newest  # nothing was stored
