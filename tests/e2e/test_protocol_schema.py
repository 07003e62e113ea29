"""contrib/protocol.schema.json is generated from the wire types, and every reply of a live
daemon matches it: each method's results in their rare shapes too, every error code taskd
can be made to send, every kind of event, the replies of a stopping daemon and of a failing
job store. A method without a case here fails the tests."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from taskd.protocol import METHODS, ErrorCode, JobEvent
from taskd.schema import protocol_schema
from taskd.server import MAX_SUBSCRIPTIONS
from tests.e2e.test_access import NOGROUP
from tests.support import RawConnection, Taskd, frame, short_tempdir, wait_until

SHIPPED = Path(__file__).parent.parent.parent / "contrib" / "protocol.schema.json"
SCHEMA = protocol_schema()
AS_ROOT = os.getuid() == 0
MAX_FRAME = 1024 * 1024
OTHER_UID = 12345  # a user taskd does not let in (setpriv can take any uid)
SETTINGS = f"max_frame_size = {MAX_FRAME}\n" + (
    f'socket_group = "{NOGROUP}"\nreadonly_users = ["nobody"]\n' if AS_ROOT else ""
)
SCHEDULES = """
[scheduled_tasks]
"0 0 1 1 *" = "echo"
"@startup" = "echo"
"""
EVENT_KINDS = set(typing.get_args(typing.get_type_hints(JobEvent)["kind"]))
# Codes no request can provoke: a bug in taskd.
UNPROVOKABLE = {ErrorCode.INTERNAL}


def test_the_shipped_schema_is_the_one_the_types_give() -> None:
    assert json.loads(SHIPPED.read_text()) == SCHEMA, "run `make schema` and commit the result"


def sent_definitions() -> dict[str, dict[str, Any]]:
    """The objects reachable from a reply, by name."""
    names: set[str] = set()
    pending: list[Any] = [SCHEMA["reply"], *(m["result"] for m in SCHEMA["methods"].values())]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and (name := ref.rsplit("/", 1)[1]) not in names:
                names.add(name)
                pending.append(SCHEMA["$defs"][name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return {name: SCHEMA["$defs"][name] for name in sorted(names)}


def test_every_key_of_every_object_taskd_sends_is_required() -> None:
    for name, definition in sent_definitions().items():
        if name == "Reply":  # `id`, and exactly one of `result`, `error` and `event`
            assert definition["required"] == ["id"] and definition["additionalProperties"] is False
            alternatives = [alternative["required"] for alternative in definition["oneOf"]]
            assert alternatives == [["result"], ["error"], ["event"]]
            continue
        properties = definition.get("properties", {})
        assert sorted(definition.get("required", [])) == sorted(properties), name


def test_the_access_of_a_connection_is_one_of_two_words() -> None:
    assert SCHEMA["$defs"]["HelloResult"]["properties"]["access"] == {"enum": ["full", "readonly"]}


# -- checking what a live daemon says ------------------------------------------------------


DRAFT = jsonschema.Draft202012Validator


def _map_keys(validator: Any, types: Any, instance: Any, schema: dict[str, Any]) -> Any:
    """JSON Schema's objects have string keys, msgpack's maps any: a map whose keys are not
    strings must say so with `propertyNames`, as a client reads the schema."""
    yield from jsonschema.Draft202012Validator.VALIDATORS["type"](
        validator, types, instance, schema
    )
    if isinstance(instance, dict) and "propertyNames" not in schema:
        for key in instance:
            if not isinstance(key, str):
                yield jsonschema.ValidationError(f"key {key!r} is not a string")


Validator = jsonschema.validators.extend(DRAFT, {"type": _map_keys})


def problems(schema: dict[str, Any], value: Any) -> list[str]:
    """What is wrong with `value` by `schema`, as messages naming where."""
    errors = Validator({"$defs": SCHEMA["$defs"], **schema}).iter_errors(value)
    return sorted(f"{error.message} at {list(error.absolute_path)}" for error in errors)


def check(schema: dict[str, Any], value: Any) -> None:
    assert not (found := problems(schema, value)), f"{found[0]}: {value}"


class Seen:
    """What the checked replies of a test held: methods answered, error codes, event kinds."""

    def __init__(self) -> None:
        self.methods: set[str] = set()
        self.codes: set[str] = set()
        self.kinds: set[str] = set()

    def reply(self, reply: dict[str, Any], method: str | None) -> None:
        """Check a reply (to `method`, if known) against the schema, and note what it held."""
        check(SCHEMA["reply"], reply)
        if "event" in reply:
            self.kinds.add(reply["event"]["kind"])
            return
        if "error" in reply:
            self.codes.add(reply["error"]["code"])
        if method is not None:
            self.methods.add(method)
            if "result" in reply:
                check(SCHEMA["methods"][method]["result"], reply["result"])


class Checked(RawConnection):
    """A raw connection whose requests and replies are checked against the schema."""

    def __init__(self, path: Path, seen: Seen, *, hello: bool = True) -> None:
        self.seen = seen
        self.methods: dict[int, str] = {}  # request id -> method
        self.refusable: set[int] = set()  # requests whose params the schema refuses
        self.later: list[dict[str, Any]] = []  # replies read while looking for another
        super().__init__(path, hello=hello)

    def request(self, method: str, params: object = None) -> bytes:
        if method in METHODS:
            check(SCHEMA["request"], {"id": self._next_id, "method": method, "params": params})
            if problems(SCHEMA["methods"][method]["params"], params or {}):
                self.refusable.add(self._next_id)
        self.methods[self._next_id] = method
        return super().request(method, params)

    def send(self, method: str, params: object = None) -> int:
        """Send a request without waiting for its reply; its id."""
        request_id = self._next_id
        self.sock.sendall(self.request(method, params))
        return request_id

    def reply(self) -> dict[str, Any]:
        reply = super().reply()
        method = self.methods.get(reply["id"]) if reply["id"] is not None else None
        self.seen.reply(reply, method if method in METHODS else None)
        if reply["id"] in self.refusable and "event" not in reply:  # the daemon agrees
            assert reply.get("error", {}).get("code") == "invalid_params", reply
        return reply

    def next_frame(self, matches: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first reply or event (read already, or still to come) that `matches`; the
        others read meanwhile are kept."""
        for index, kept in enumerate(self.later):
            if matches(kept):
                return self.later.pop(index)
        while not matches(reply := self.reply()):
            self.later.append(reply)
        return reply

    def reply_to(self, request_id: int) -> dict[str, Any]:
        return self.next_frame(lambda reply: reply["id"] == request_id and "event" not in reply)

    def event(self, matches: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        event: dict[str, Any] = self.next_frame(
            lambda reply: "event" in reply and matches(reply["event"])
        )["event"]
        return event

    def subscribe(self, params: dict[str, Any]) -> int:
        """Subscribe; the subscription's id, once it is live."""
        request_id = self.send("subscribe", params)
        first = self.next_frame(lambda reply: reply["id"] == request_id)
        assert first["event"]["kind"] == "subscribed", first
        return request_id

    def call(self, method: str, params: object = None) -> dict[str, Any]:
        return self.reply_to(self.send(method, params))

    def result(self, method: str, params: object = None) -> Any:
        reply = self.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    def error(self, method: str, params: object = None) -> str:
        reply = self.call(method, params)
        assert "error" in reply, reply
        code: str = reply["error"]["code"]
        return code


def until_ended(connection: Checked, job_id: int) -> dict[str, Any]:
    job: dict[str, Any] = connection.result("wait", {"id": job_id, "timeout": 60.0})
    return job


def until_running(connection: Checked, job_id: int) -> None:
    running = lambda: connection.result("job", {"id": job_id})["status"] == "running"  # noqa: E731
    wait_until(running, what=f"job {job_id} to run")


class Gate:
    """A `steps` job that takes a step per line written to its gate (a FIFO)."""

    def __init__(self, connection: Checked, folder: Path) -> None:
        fifo = folder / f"gate-{time.monotonic_ns()}"
        os.mkfifo(fifo)
        payload = {"steps": 3, "gate": str(fifo)}
        enqueued = connection.result("enqueue", {"task": "steps", "payload": payload})
        self.job_id: int = enqueued["job_id"]
        self.file = open(fifo, "w")  # noqa: SIM115 (opens once the task has opened its end)

    def step(self) -> None:
        self.file.write("\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()  # the task reads the end: its remaining steps go by at once


@pytest.fixture(scope="module")
def daemon() -> Iterator[Taskd]:
    root = short_tempdir()
    root.chmod(0o755)  # other users reach the socket through its group (as root)
    running = Taskd(
        root,
        config=SETTINGS + SCHEDULES,
        socket_path=root / "run" / "taskd.sock",
        log_level="info",
    ).start()
    yield running
    assert running.stop() == 0, running.log
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def connection(daemon: Taskd) -> Iterator[Checked]:
    with Checked(daemon.socket, Seen()) as checked:
        yield checked


# -- one case per method: its results, in their rare shapes too ------------------------------


def case_hello(connection: Checked, daemon: Taskd, folder: Path) -> None:
    hello = connection.result("hello", {"protocol": 1, "client": "schema-test/1"})
    assert hello["access"] == "full"
    assert connection.error("hello", {"protocol": 2}) == "unsupported_protocol"


def case_list_tasks(connection: Checked, daemon: Taskd, folder: Path) -> None:
    tasks = {task["name"]: task for task in connection.result("list_tasks")}
    assert tasks["email"]["payload_schema"] is not None and tasks["echo"]["schedules"]
    assert tasks["timeout"]["timeout"] is not None


def case_run(connection: Checked, daemon: Taskd, folder: Path) -> None:
    assert connection.result("run", {"task": "echo", "payload": {"a": [1, None]}})["job"]
    failed = connection.result("run", {"task": "fail", "payload": "x", "max_attempts": 1})
    assert failed["job"]["status"] == "failed"
    slow = {"task": "slow", "payload": {"seconds": 60}, "key": "run-case", "detach": True}
    first = connection.result("run", slow)
    joined = connection.result("run", slow)
    assert joined["joined"] and joined["job"]["id"] == first["job"]["id"]
    connection.result("cancel", {"id": first["job"]["id"]})
    assert connection.error("run", {"task": "nope"}) == "unknown_task"
    assert connection.error("run", {"task": "email", "payload": {"to": 1}}) == "payload_invalid"


def case_enqueue(connection: Checked, daemon: Taskd, folder: Path) -> None:
    params = {"task": "echo", "delay": 3600.0, "priority": 5, "max_attempts": 2, "key": "k1"}
    first = connection.result("enqueue", params)
    assert connection.result("enqueue", params) == {"job_id": first["job_id"], "duplicate": True}
    connection.result("enqueue", {"task": "echo", "run_at": time.time() + 3600})
    connection.result("cancel", {"id": first["job_id"]})
    assert connection.error("enqueue", {"task": "echo", "delay": -1.0}) == "invalid_params"


def case_enqueue_many(connection: Checked, daemon: Taskd, folder: Path) -> None:
    items = [{"task": "echo"}, {"task": "echo", "key": "many", "delay": 3600.0}]
    assert len(connection.result("enqueue_many", {"jobs": items})["jobs"]) == 2
    again = connection.result("enqueue_many", {"jobs": items[1:]})["jobs"]
    assert again[0]["duplicate"]
    reply = connection.call("enqueue_many", {"jobs": [{"task": "echo"}, {"task": "nope"}]})
    assert reply["error"]["data"]["index"] == 1


def case_batch(connection: Checked, daemon: Taskd, folder: Path) -> None:
    jobs = [{"task": "echo", "payload": n} for n in range(2)]
    made = connection.result("enqueue_many", {"jobs": jobs, "on_finish": "echo"})
    for job in made["jobs"]:
        until_ended(connection, job["job_id"])
    batch = connection.result("batch", {"id": made["batch"]})
    assert batch["total"] == 2 and batch["ended"] == 2 and batch["callback_id"] is not None
    assert connection.error("batch", {"id": 10**12}) == "unknown_job"


def case_job(connection: Checked, daemon: Taskd, folder: Path) -> None:
    timed_out = connection.result("run", {"task": "timeout", "payload": {"seconds": 5}})["job"]
    shown = connection.result("job", {"id": timed_out["id"]})
    assert [error["kind"] for error in shown["errors"]] == ["timeout"]
    failed = connection.result("run", {"task": "fail", "max_attempts": 1})["job"]
    connection.result("retry", {"id": failed["id"]})
    until_ended(connection, failed["id"])
    shown = connection.result("job", {"id": failed["id"]})
    kinds = [error["kind"] for error in shown["errors"]]
    assert kinds == ["error", "retried", "error"] and shown["errors"][0]["traceback"]
    ran = connection.result("run", {"task": "steps", "payload": {"steps": 2}})["job"]
    assert connection.result("job", {"id": ran["id"]})["progress"]["done"] == 2
    assert connection.error("job", {"id": 10**12}) == "unknown_job"


def case_jobs(connection: Checked, daemon: Taskd, folder: Path) -> None:
    connection.result("run", {"task": "echo", "payload": "shown"})
    assert connection.result("jobs", {})
    shown = connection.result("jobs", {"payloads": True, "status": ["succeeded"], "limit": 5})
    assert any(job["payload"] == "shown" for job in shown)
    assert connection.result("jobs", {"task": "echo", "status": ["running"]}) == []
    assert connection.error("jobs", {"task": "nope"}) == "unknown_task"


def case_wait(connection: Checked, daemon: Taskd, folder: Path) -> None:
    ended = connection.result("run", {"task": "echo"})["job"]
    assert until_ended(connection, ended["id"])["status"] == "succeeded"
    log = folder / "flaky.log"
    payload = {"log": str(log), "succeed_on": 2}
    flaky = connection.result("enqueue", {"task": "flaky", "payload": payload})["job_id"]
    retrying = connection.result("wait", {"id": flaky, "after_attempt": 0})
    assert retrying["errors"] and retrying["status"] in ("pending", "running")
    assert until_ended(connection, flaky)["status"] == "succeeded"
    later = connection.result("enqueue", {"task": "echo", "delay": 3600.0})["job_id"]
    assert connection.error("wait", {"id": later, "timeout": 0.0}) == "timeout"
    connection.result("cancel", {"id": later})


def case_cancel(connection: Checked, daemon: Taskd, folder: Path) -> None:
    pending = connection.result("enqueue", {"task": "echo", "delay": 3600.0})["job_id"]
    assert connection.result("cancel", {"id": pending})["status"] == "cancelled"
    running = connection.result("enqueue", {"task": "slow", "payload": {"seconds": 60}})["job_id"]
    until_running(connection, running)
    cancelled = connection.result("cancel", {"id": running})
    assert cancelled["status"] == "cancelled"
    assert connection.error("cancel", {"id": running}) == "conflict"


def case_retry(connection: Checked, daemon: Taskd, folder: Path) -> None:
    failed = connection.result("run", {"task": "fail", "max_attempts": 1})["job"]
    assert connection.result("retry", {"id": failed["id"]})["status"] == "pending"
    until_ended(connection, failed["id"])


def case_status(connection: Checked, daemon: Taskd, folder: Path) -> None:
    gate = Gate(connection, folder)
    try:
        gate.step()
        stored = lambda: connection.result("job", {"id": gate.job_id})["progress"]  # noqa: E731
        wait_until(stored, what="the progress to be stored")
        status = connection.result("status")
        (running,) = [job for job in status["running"] if job["id"] == gate.job_id]
        assert running["progress"] is not None and status["connections"]["per_user"]
    finally:
        gate.close()
    until_ended(connection, gate.job_id)


def case_prune(connection: Checked, daemon: Taskd, folder: Path) -> None:
    connection.result("run", {"task": "echo"})
    assert connection.result("prune", {"older_than": 0.0})["deleted"] >= 1
    assert connection.result("prune", {})["deleted"] == 0


def case_reload(connection: Checked, daemon: Taskd, folder: Path) -> None:
    assert connection.result("reload")["restart_needed"] == []
    daemon.config_file.write_text(SETTINGS + "workers = 3\n" + SCHEDULES)
    try:
        assert connection.result("reload")["restart_needed"] == ["workers"]
        daemon.config_file.write_text("workers = [")
        assert connection.error("reload") == "reload_failed"
    finally:
        daemon.config_file.write_text(SETTINGS + SCHEDULES)
        connection.result("reload")


def case_schedules(connection: Checked, daemon: Taskd, folder: Path) -> None:
    listed = {schedule["cron"]: schedule for schedule in connection.result("schedules")}
    assert listed["0 0 1 1 *"]["next_tick"] is not None
    wait_until(lambda: connection.result("schedules")[1]["last_jobs"], what="@startup to fire")


def case_pause_schedule(connection: Checked, daemon: Taskd, folder: Path) -> None:
    assert connection.result("pause_schedule", {"schedule": "0 0 1 1 *"})["paused"]
    connection.result("resume_schedule", {"schedule": "0 0 1 1 *"})
    assert connection.error("pause_schedule", {"schedule": "nope"}) == "unknown_schedule"


def case_resume_schedule(connection: Checked, daemon: Taskd, folder: Path) -> None:
    connection.result("pause_schedule", {"schedule": "0 0 1 1 *"})
    assert not connection.result("resume_schedule", {"schedule": "0 0 1 1 *"})["paused"]


def case_trigger_schedule(connection: Checked, daemon: Taskd, folder: Path) -> None:
    fired = connection.result("trigger_schedule", {"schedule": "0 0 1 1 *"})
    assert fired["last_jobs"] and fired["fired_at"] is not None
    until_ended(connection, fired["last_jobs"][0]["id"])
    fired = connection.result("schedules")[0]
    assert fired["last_outcome"] == "succeeded" and fired["last_jobs"][0]["status"]


def case_pause_task(connection: Checked, daemon: Taskd, folder: Path) -> None:
    paused = connection.result("pause_task", {"task": "chatty"})
    assert paused["changed"] and paused["since"] is not None
    assert not connection.result("pause_task", {"task": "chatty"})["changed"]
    connection.result("resume_task", {"task": "chatty"})
    assert connection.error("pause_task", {"task": "nope"}) == "unknown_task"


def case_resume_task(connection: Checked, daemon: Taskd, folder: Path) -> None:
    connection.result("pause_task", {"task": "chatty"})
    resumed = connection.result("resume_task", {"task": "chatty"})
    assert resumed["changed"] and resumed["since"] is None


def case_metrics(connection: Checked, daemon: Taskd, folder: Path) -> None:
    assert connection.result("metrics").startswith("# HELP")


def case_logs(connection: Checked, daemon: Taskd, folder: Path) -> None:
    chatty = connection.result("run", {"task": "chatty", "payload": {"lines": 1005}})["job"]
    logs = connection.result("logs", {"id": chatty["id"]})
    assert len(logs["lines"]) == 1000 and logs["dropped"] == 5
    assert connection.error("logs", {"id": 10**12}) == "unknown_job"


def case_subscribe(connection: Checked, daemon: Taskd, folder: Path) -> None:
    # A job that does not exist (yet) may be subscribed to.
    unknown = connection.subscribe({"job": 10**12})
    everything = connection.subscribe({"logs": False})
    ended = connection.result("run", {"task": "echo"})["job"]
    event = connection.event(lambda event: event["job_id"] == ended["id"])
    assert event["kind"] == "state"
    for subscription, events in ((unknown, 0), (everything, 1)):
        assert connection.result("unsubscribe", {"id": subscription}) is True
        assert connection.reply_to(subscription)["result"]["events"] >= events


def case_unsubscribe(connection: Checked, daemon: Taskd, folder: Path) -> None:
    assert connection.result("unsubscribe", {"id": 10**6}) is False


def case_why(connection: Checked, daemon: Taskd, folder: Path) -> None:
    later = connection.result("enqueue", {"task": "echo", "delay": 3600.0})["job_id"]
    assert connection.result("why", {"id": later})["until"] is not None
    connection.result("cancel", {"id": later})
    failed = connection.result("run", {"task": "fail", "max_attempts": 1})["job"]
    timeline = connection.result("why", {"id": failed["id"]})["timeline"]
    assert [event["event"] for event in timeline] == ["created", "started", "error", "failed"]
    assert connection.error("why", {"id": 10**12}) == "unknown_job"


CASES: dict[str, Callable[[Checked, Taskd, Path], None]] = {
    name.removeprefix("case_"): case
    for name, case in list(globals().items())
    if name.startswith("case_") and callable(case)
}


def test_every_method_has_a_case() -> None:
    assert sorted(CASES) == sorted(METHODS), "give the new method a case_ here"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_replies_of_each_method_match_the_schema(
    daemon: Taskd, connection: Checked, short_tmp: Path, method: str
) -> None:
    CASES[method](connection, daemon, short_tmp)
    assert method in connection.seen.methods


# -- events --------------------------------------------------------------------------------


def test_every_kind_of_event_matches_the_schema(daemon: Taskd, connection: Checked) -> None:
    subscription = connection.subscribe({})
    with Checked(daemon.socket, connection.seen) as other:
        other.result("run", {"task": "steps", "payload": {"steps": 3}})  # progress and lines
        # Far more lines than a subscription holds, while this connection reads nothing.
        other.result("run", {"task": "chatty", "payload": {"lines": 5000}})
    unsubscribe = connection.send("unsubscribe", {"id": subscription})
    assert connection.reply_to(subscription)["result"]["dropped"] > 0
    connection.reply_to(unsubscribe)
    assert connection.seen.kinds == EVENT_KINDS


# -- errors, of every code a request can provoke --------------------------------------------


def provoke_framing_errors(daemon: Taskd, seen: Seen) -> None:
    """bad_frame, hello_required, unknown_method, frame_too_large (of a request, and of a
    reply), busy."""
    with Checked(daemon.socket, seen, hello=False) as connection:
        assert connection.error("jobs") == "hello_required"
        connection.sock.sendall(frame(b"\xc1"))
        assert connection.reply()["error"]["code"] == "bad_frame"
    with Checked(daemon.socket, seen) as connection:
        assert connection.error("explode") == "unknown_method"
        big = "x" * (MAX_FRAME // 4 - 64)
        jobs = [{"task": "echo", "payload": big, "delay": 3600.0} for _ in range(5)]
        enqueued = [connection.result("enqueue", job)["job_id"] for job in jobs]
        query = {"payloads": True, "status": ["pending"], "task": "echo"}
        assert connection.error("jobs", query) == "frame_too_large"
        for job_id in enqueued:
            connection.result("cancel", {"id": job_id})
        for _ in range(MAX_SUBSCRIPTIONS):
            connection.subscribe({})
        assert connection.error("subscribe", {}) == "busy"
        connection.sock.sendall(struct.pack(">I", MAX_FRAME + 1))
        while "error" not in (reply := connection.reply()) or reply["id"] is not None:
            pass  # events of the subscriptions
        assert reply["error"]["code"] == "frame_too_large"


def provoke_stopping(taskd_factory: type[Taskd], short_tmp: Path, seen: Seen) -> None:
    """shutting_down, to a new connection and to a request in flight at the stop; and the
    reply that ends a subscription when taskd stops."""
    short_tmp.mkdir()
    daemon = taskd_factory(root=short_tmp, config='grace_period = "5s"\n').start()
    with Checked(daemon.socket, seen) as connection:
        slow = connection.result("enqueue", {"task": "slow", "payload": {"seconds": 60}})
        until_running(connection, slow["job_id"])
        subscription = connection.subscribe({"job": slow["job_id"]})
        waiting = connection.send("wait", {"id": slow["job_id"]})
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            with RawConnection(daemon.socket, hello=False) as probe:
                hello = probe.request("hello", {"protocol": 1})
                with contextlib.suppress(OSError):  # refused and closed already
                    probe.sock.sendall(hello)
                reply = probe.reply()
            seen.reply(reply, "hello" if reply["id"] == 1 else None)
            return "error" in reply and reply["error"]["code"] == "shutting_down"

        wait_until(refused, what="a new connection to be told taskd is stopping")
        assert connection.reply_to(waiting)["error"]["code"] == "shutting_down"
        assert "result" in connection.reply_to(subscription)  # the end of its events
        assert connection.closed_by_taskd()
    assert daemon.process.wait(30) == 0


def provoke_store_error(taskd_factory: type[Taskd], short_tmp: Path, seen: Seen) -> None:
    """store_error, and a status whose store_failing says what fails."""
    short_tmp.mkdir()
    limit = 3_000_000  # a file-size limit makes the database's writes fail as on a full disk
    daemon = taskd_factory(root=short_tmp).start(
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    )
    with Checked(daemon.socket, seen) as connection:
        job = {"task": "echo", "payload": "x" * 400_000, "delay": 3600.0}
        replies = (connection.call("enqueue", job) for _ in range(20))
        refused = next(reply for reply in replies if "error" in reply)
        assert refused["error"]["code"] == "store_error"
        assert "insert" in connection.result("status")["store_failing"]["operations"]
    assert daemon.stop() == 0


PEER = """
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(30)
sock.connect(sys.argv[1])
for request in sys.argv[2:]:
    try:
        sock.sendall(bytes.fromhex(request))
    except OSError:
        pass  # refused and closed already; the refusal is still there to read
    header = sock.recv(4, socket.MSG_WAITALL)
    print(sock.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL).hex(), flush=True)
sys.stdin.read()  # holds the connection until told to let go
"""


def as_other_user(daemon: Taskd, uid: int | str, *requests: tuple[str, object]) -> Any:
    """Send requests as `uid` (in the socket's group) on one connection; the process, which
    holds the connection until its stdin closes, and the replies."""
    frames = [RawConnection.request_frame(n, m, p).hex() for n, (m, p) in enumerate(requests, 1)]
    command = ["setpriv", f"--reuid={uid}", f"--regid={NOGROUP}", "--clear-groups",
               sys.executable, "-c", PEER, str(daemon.socket), *frames]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
    )
    assert process.stdout is not None
    replies = [msgspec.msgpack.decode(bytes.fromhex(process.stdout.readline())) for _ in requests]
    return process, replies


def provoke_access_errors(daemon: Taskd, seen: Seen) -> None:
    """permission_denied at connect (id null) and for a write of a read-only peer; hello's
    `readonly`; and a status whose per_user counts another user (its uid a map key)."""
    refused, replies = as_other_user(daemon, OTHER_UID, ("hello", {"protocol": 1}))
    refused.communicate(timeout=30)
    (refusal,) = replies
    seen.reply(refusal, None)
    assert refusal["id"] is None and refusal["error"]["code"] == "permission_denied"
    requests = [("hello", {"protocol": 1}), ("run", {"task": "echo"})]
    reader, (hello, denied) = as_other_user(daemon, "nobody", *requests)
    try:
        seen.reply(hello, "hello")
        seen.reply(denied, "run")
        assert hello["result"]["access"] == "readonly"
        assert denied["error"]["code"] == "permission_denied"
        with Checked(daemon.socket, seen) as connection:
            assert connection.result("status")["connections"]["per_user"][65534] == 1
    finally:
        reader.communicate(timeout=30)


def test_every_error_code_taskd_can_send_matches_the_schema(
    daemon: Taskd, taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    seen = Seen()
    with Checked(daemon.socket, seen) as connection:
        for case in CASES.values():  # the errors each method has of its own
            case(connection, daemon, short_tmp)
    provoke_framing_errors(daemon, seen)
    provoke_stopping(taskd_factory, short_tmp / "stopping", seen)
    provoke_store_error(taskd_factory, short_tmp / "failing", seen)
    expected = set(ErrorCode) - UNPROVOKABLE
    if AS_ROOT:
        provoke_access_errors(daemon, seen)
    else:
        expected.discard(ErrorCode.PERMISSION_DENIED)  # another user needs root to be had
    assert seen.codes == expected
