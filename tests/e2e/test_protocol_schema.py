"""contrib/protocol.schema.json is generated from the wire types, and a live daemon's replies
match it: every key the schema requires is there, with the type it gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

from taskd.schema import protocol_schema
from tests.support import RawConnection, Taskd

SHIPPED = Path(__file__).parent.parent.parent / "contrib" / "protocol.schema.json"
SCHEMA = protocol_schema()
CONFIG = """
[scheduled_tasks]
"0 0 1 1 *" = "echo"
"@startup" = "echo"
"""


def test_the_shipped_schema_is_the_one_the_types_give() -> None:
    assert json.loads(SHIPPED.read_text()) == SCHEMA, "run `make schema` and commit the result"


def check(schema: dict[str, Any], value: Any) -> None:
    validator = jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], **schema})
    errors = sorted(validator.iter_errors(value), key=str)
    assert not errors, f"{errors[0].message} at {list(errors[0].absolute_path)}: {value}"


class Checked(RawConnection):
    """A raw connection that checks each request and reply against the schema."""

    def call(self, method: str, params: object = None) -> dict[str, Any]:
        check(SCHEMA["request"], {"id": self._next_id, "method": method, "params": params or {}})
        check(SCHEMA["methods"][method]["params"], params or {})
        reply = super().call(method, params)
        check(SCHEMA["reply"], reply)
        if "result" in reply:
            check(SCHEMA["methods"][method]["result"], reply["result"])
        return reply


def test_every_reply_matches_the_schema(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=CONFIG).start()
    with Checked(daemon.socket) as connection:
        assert "result" in connection.call("hello", {"protocol": 1})
        connection.call("list_tasks")
        ran = connection.call("run", {"task": "echo", "payload": {"a": [1, None]}})
        job_id = ran["result"]["job"]["id"]
        connection.call("run", {"task": "fail", "payload": "x"})
        later = connection.call("enqueue", {"task": "echo", "delay": 3600.0})["result"]["job_id"]
        connection.call("enqueue_many", {"jobs": [{"task": "echo"}, {"task": "echo", "key": "k"}]})
        connection.call("job", {"id": job_id})
        connection.call("jobs", {})
        connection.call("jobs", {"payloads": True, "status": ["succeeded", "failed"]})
        connection.call("wait", {"id": job_id, "timeout": 5.0})
        connection.call("cancel", {"id": later})
        assert connection.call("job", {"id": later})["result"]["errors"] == []
        connection.call("retry", {"id": later})
        connection.call("status")
        connection.call("schedules")
        connection.call("pause_schedule", {"schedule": "0 0 1 1 *"})
        connection.call("resume_schedule", {"schedule": "0 0 1 1 *"})
        connection.call("trigger_schedule", {"schedule": "@startup"})
        connection.call("prune", {"older_than": 0.0})
        connection.call("reload")
        # Errors too: an ErrorBody with code, message and data.
        for method, params in [("job", {"id": 10**9}), ("run", {"task": "nope"})]:
            assert "error" in connection.call(method, params)
