"""The spine through its real interfaces: a taskd process, the taskctl command, the socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from taskd.protocol import PROTOCOL_VERSION, Request, encode_frame
from tests.support import Taskd, wait_until


def test_list_shows_every_task(taskd: Taskd) -> None:
    table = taskd.ctl("list")
    assert table.returncode == 0, table.stderr
    assert "NAME" in table.stdout and "nested:deep:send-it" in table.stdout
    listed = json.loads(taskd.ctl("--json", "list").stdout)
    names = [task["name"] for task in listed]
    assert names == sorted(names)
    assert {"echo", "email", "db", "nested:deep:send-it", "slow"} <= set(names)
    email = next(task for task in listed if task["name"] == "email")
    assert email["description"] == "Typed payload" and email["schedules"] == []
    assert email["payload_schema"]["$ref"].endswith("Email")


def test_run_with_payload_prints_the_result(taskd: Taskd) -> None:
    done = taskd.ctl("run", "email", "--payload", '{"to": "ada@example.com", "subject": "Hi"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"to": "ada@example.com", "subject": "Hi", "attempt": 1}
    assert done.stderr == ""


def test_no_payload_is_an_empty_map_as_in_nitro(taskd: Taskd) -> None:
    assert json.loads(taskd.ctl("run", "echo").stdout) == {}
    ran = taskd.ctl("run", "blocking")  # its payload must be a dict
    assert ran.returncode == 0, ran.stderr
    enqueued = int(taskd.ctl("enqueue", "echo").stdout)
    assert json.loads(taskd.ctl("wait", str(enqueued)).stdout) == {}
    with taskd.client() as client:
        assert client.run("echo") == {}
        assert client.run("echo", None) == {}
        assert client.run("echo", []) == []
    # ctx.run_task and ctx.enqueue without a payload: the other task gets {} as well.
    bare = json.loads(taskd.ctl("run", "bare").stdout)
    assert bare["ran"] == {}
    assert json.loads(taskd.ctl("wait", str(bare["queued"])).stdout) == {}


def test_payload_from_file_and_stdin(taskd: Taskd, short_tmp: Path) -> None:
    payload_file = short_tmp / "payload.json"
    payload_file.write_text('{"from": "file"}')
    assert json.loads(taskd.ctl("run", "echo", "--payload", f"@{payload_file}").stdout) == {
        "from": "file"
    }
    piped = taskd.ctl("run", "echo", "--payload", "-", input='[1, "two"]')
    assert json.loads(piped.stdout) == [1, "two"]
    assert json.loads(taskd.ctl("run", "nested:deep:send-it").stdout) == 42
    assert json.loads(taskd.ctl("run", "db").stdout) == "db"


def test_failing_task_exits_1_with_its_error(taskd: Taskd) -> None:
    failed = taskd.ctl("run", "fail", "--payload", '"x"')
    assert failed.returncode == 1
    assert "ValueError: boom: x" in failed.stderr
    assert failed.stdout == ""
    as_json = taskd.ctl("--json", "run", "fail", "--payload", '"y"')
    assert as_json.returncode == 1
    job = json.loads(as_json.stdout)
    assert job["status"] == "failed" and job["error"] == "ValueError: boom: y"
    # Every failure is logged with the task name, the job id and the traceback.
    log = taskd.log
    assert f"job {job['id']} fail attempt 1/1 failed: ValueError: boom: y" in log
    assert 'raise ValueError(f"boom: {payload}")' in log


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["run", "echo", "--payload", "{not json"], 2, "--payload is not valid JSON"),
        (["run", "echo", "--payload", "@/no/such/file"], 2, "cannot read payload file"),
        (["run"], 2, "required: NAME"),
        (["jobs", "--status", "sleeping"], 2, "unknown status 'sleeping'"),
        (["enqueue", "echo", "--delay", "soon"], 2, "invalid duration 'soon'"),
        (["frobnicate"], 2, "invalid choice"),
        (["run", "no:such-task"], 4, "unknown task 'no:such-task'"),
        (["job", "999999"], 4, "no job with id 999999"),
        (["run", "email", "--payload", '{"to": 5}'], 65, "payload rejected by task email"),
        (["run", "email"], 65, "(the payload was {}); no --payload was given, so the task got {}"),
        (["enqueue", "email", "--payload", "{}"], 65, "(the payload was {})"),
    ],
)
def test_exit_codes(taskd: Taskd, args: list[str], code: int, message: str) -> None:
    result = taskd.ctl(*args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert message in result.stderr
    if "--payload" in args:  # the message does not say that none was given
        assert "no payload" not in result.stderr and "no --payload" not in result.stderr


def test_unreachable_daemon_exits_7_naming_the_socket(short_tmp: Path) -> None:
    missing = short_tmp / "absent.sock"
    result = Taskd(short_tmp).ctl("list")  # nothing started
    assert result.returncode == 7
    assert str(short_tmp / "taskd.sock") in result.stderr and "Is taskd running?" in result.stderr
    env = {**os.environ, "TASKD_SOCKET": str(missing)}
    command = [sys.executable, "-m", "taskctl", "list"]
    via_env = subprocess.run(command, capture_output=True, text=True, env=env)
    assert via_env.returncode == 7 and str(missing) in via_env.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run taskctl as another user")
def test_permission_denied_exits_77(taskd: Taskd) -> None:
    result = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-m", "taskctl", "--socket", str(taskd.socket), "list"],
        capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    assert result.returncode == 77, result.stderr
    assert "permission" in result.stderr


def test_socket_file_is_private(taskd: Taskd) -> None:
    mode = stat.S_IMODE(taskd.socket.stat().st_mode)
    assert mode == 0o600


def raw_exchange(sock: socket.socket, frame: bytes) -> dict[str, object]:
    sock.sendall(frame)
    header = sock.recv(4, socket.MSG_WAITALL)
    (size,) = struct.unpack(">I", header)
    return msgspec.msgpack.decode(sock.recv(size, socket.MSG_WAITALL))  # type: ignore[no-any-return]


def hello_frame(request_id: int = 1) -> bytes:
    params = msgspec.msgpack.encode({"protocol": PROTOCOL_VERSION})
    return encode_frame(Request(request_id, "hello", msgspec.Raw(params)))


def test_garbage_frame_gets_an_error_and_the_daemon_keeps_serving(taskd: Taskd) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(taskd.socket))
        sock.settimeout(10)
        assert raw_exchange(sock, hello_frame())["result"]
        garbage = b"\xc1\xff\x00garbage"
        reply = raw_exchange(sock, struct.pack(">I", len(garbage)) + garbage)
        assert reply["id"] is None and reply["error"]["code"] == "bad_frame"  # type: ignore[index]
        # The frame boundaries held, so the same connection still works.
        job_request = encode_frame(Request(2, "jobs", msgspec.Raw(msgspec.msgpack.encode({}))))
        assert raw_exchange(sock, job_request)["id"] == 2
        unknown = encode_frame(Request(3, "explode", msgspec.Raw(b"\x80")))
        assert raw_exchange(sock, unknown)["error"]["code"] == "unknown_method"  # type: ignore[index]
        bad_params = encode_frame(
            Request(4, "job", msgspec.Raw(msgspec.msgpack.encode({"id": "x"})))
        )
        error = raw_exchange(sock, bad_params)["error"]
        assert error["code"] == "invalid_params" and "$.id" in error["message"]  # type: ignore[index]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(taskd.socket))
        sock.settimeout(10)
        request = encode_frame(Request(1, "jobs", msgspec.Raw(b"\x80")))
        assert raw_exchange(sock, request)["error"]["code"] == "hello_required"  # type: ignore[index]
        reply = raw_exchange(sock, struct.pack(">I", 1 << 30))  # announces a gigabyte
        assert reply["error"]["code"] == "frame_too_large"  # type: ignore[index]
        assert sock.recv(1) == b""  # and the connection is closed
    assert taskd.ctl("run", "echo", "--payload", '"still here"').stdout.strip() == '"still here"'


def test_concurrent_runs_join_one_execution(taskd: Taskd, short_tmp: Path) -> None:
    record = short_tmp / "record.txt"
    payload = json.dumps({"seconds": 1.0, "record": str(record)})
    first = subprocess.Popen(
        [sys.executable, "-m", "taskctl", "--socket", str(taskd.socket), "--json", "run", "slow",
         "--payload", payload], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(lambda: taskd.ctl("--json", "jobs", "--task", "slow").stdout.count('"id"'))
    second = taskd.ctl("--json", "run", "slow", "--payload", '{"seconds": 0, "other": true}')
    out, _ = first.communicate(timeout=30)
    assert first.returncode == 0 and second.returncode == 0
    assert json.loads(out)["id"] == json.loads(second.stdout)["id"]
    assert "joined job" in second.stderr and "its payload was used, not yours" in second.stderr
    assert json.loads(second.stdout)["result"] == json.loads(payload)
    assert len(record.read_text().splitlines()) == 1


def test_detach_returns_the_job_id_and_records_the_outcome(taskd: Taskd) -> None:
    detached = taskd.ctl("run", "fail", "--payload", '"later"', "--detach")
    assert detached.returncode == 0
    job_id = int(detached.stdout)
    waited = taskd.ctl("wait", str(job_id))
    assert waited.returncode == 1 and "boom: later" in waited.stderr
    shown = json.loads(taskd.ctl("--json", "job", str(job_id)).stdout)
    expected = {"id", "task", "status", "attempts", "payload", "result", "error", "created_at",
                "started_at", "finished_at"}  # fmt: skip
    assert expected <= set(shown)
    assert shown["status"] == "failed" and shown["payload"] == "later"
    assert shown["created_at"].endswith("+00:00")
    assert f"job {job_id} fail attempt 1/1 failed" in taskd.log


def test_job_jobs_and_status(taskd: Taskd) -> None:
    for word in ("a", "b", "c"):
        assert taskd.ctl("run", "echo", "--payload", json.dumps(word)).returncode == 0
    taskd.ctl("run", "fail")
    jobs = json.loads(taskd.ctl("--json", "jobs").stdout)
    assert [job["status"] for job in jobs] == ["failed", "succeeded", "succeeded", "succeeded"]
    assert [job["id"] for job in jobs] == sorted((job["id"] for job in jobs), reverse=True)
    only = json.loads(taskd.ctl("--json", "jobs", "--status", "failed", "--task", "fail").stdout)
    assert len(only) == 1
    assert len(json.loads(taskd.ctl("--json", "jobs", "--limit", "2").stdout)) == 2
    human = taskd.ctl("job", str(jobs[0]["id"]))
    assert "ValueError: boom" in human.stdout and "attempt 1 error" in human.stdout
    status = json.loads(taskd.ctl("--json", "status").stdout)
    assert status["pid"] == taskd.process.pid  # type: ignore[union-attr]
    assert status["counts"] == {"succeeded": 3, "failed": 1}
    assert status["database"].endswith("taskd.db") and status["socket"] == str(taskd.socket)
    (node,) = status["nodes"]  # this daemon, alive on its store, running nothing now
    assert node["id"] == status["node"] and node["pid"] == status["pid"]
    assert node["worker"] == f"{status['node']}/1" and node["running"] == 0
    human = taskd.ctl("status").stdout
    assert "up " in human and f"node:      {status['node']}" in human


def test_sigterm_lets_the_running_task_finish(taskd: Taskd, short_tmp: Path) -> None:
    started = short_tmp / "started.txt"
    runner = subprocess.Popen(
        [sys.executable, "-m", "taskctl", "--socket", str(taskd.socket), "run", "slow",
         "--payload", json.dumps({"seconds": 1.0, "started": str(started)})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(started.exists, what="the task to start")
    assert taskd.process is not None
    taskd.process.send_signal(signal.SIGTERM)
    out, err = runner.communicate(timeout=30)
    assert runner.returncode == 0, err
    assert json.loads(out)["seconds"] == 1.0
    assert taskd.process.wait(30) == 0
    assert not taskd.socket.exists()
    assert "stopped" in taskd.log


def test_second_daemon_refuses_and_stale_socket_is_replaced(taskd_factory: type[Taskd]) -> None:
    first = taskd_factory().start()
    second = taskd_factory()
    with pytest.raises(AssertionError, match="exited with 1"):
        second.start()
    assert (
        "another taskd is already serving" in second.log or "in use by another taskd" in second.log
    )
    assert first.ctl("list").returncode == 0  # the first one is untouched
    first.kill()
    assert first.socket.exists()  # a crashed daemon leaves its socket behind
    third = taskd_factory().start()
    assert "replacing stale socket" in third.log
    assert third.ctl("list").returncode == 0
    assert third.stop() == 0


def test_broken_task_file_stops_startup_naming_it(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    tasks = short_tmp / "tasks"
    tasks.mkdir()
    (tasks / "ok.py").write_text(
        "from taskd import define_task\n@define_task\ndef ok():\n    pass\n"
    )
    (tasks / "bad.py").write_text("import nowhere_to_be_found\n")
    daemon = taskd_factory(tasks=tasks)
    with pytest.raises(AssertionError, match="exited with 78"):
        daemon.start()
    assert f"{tasks / 'bad.py'}: failed to import: ModuleNotFoundError" in daemon.log


def test_many_clients_at_once(taskd: Taskd) -> None:
    errors: list[BaseException] = []

    def call(n: int) -> None:
        try:
            with taskd.client() as client:
                assert client.run("echo", n, key=f"caller-{n}") == n
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def test_postgresql_without_its_extra_exits_78_naming_it(short_tmp: Path) -> None:
    # A real taskd process in which asyncpg cannot be imported, as after a plain
    # `pip install taskd`.
    blocked = "import sys; sys.modules['asyncpg'] = None; from taskd.cli import main; "
    started = subprocess.run(
        [sys.executable, "-c", blocked + "sys.exit(main(sys.argv[1:]))",
         "--database", "postgresql://nobody@127.0.0.1:1/none", "--socket",
         str(short_tmp / "s.sock"), "--tasks", str(short_tmp)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert started.returncode == 78, started.stderr
    lines = started.stderr.splitlines()
    assert len(lines) == 1 and "pip install 'taskd[postgres]'" in lines[0], started.stderr
    assert not (short_tmp / "s.sock").exists()
