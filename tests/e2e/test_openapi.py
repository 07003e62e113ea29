"""contrib/openapi.json is generated from the HTTP API's types, a live taskd serves it, and
schemathesis, fuzzing the API from it, finds no server error and no answer it does not
describe."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from taskd.http.api import STATUS_FOR_CODE, HttpErrorCode
from taskd.protocol import ErrorCode
from taskd.schema import openapi_schema
from tests.http_support import TOKEN, HttpClient, http_config
from tests.support import Taskd

SHIPPED = Path(__file__).parent.parent.parent / "contrib" / "openapi.json"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# What schemathesis checks: no 5xx, and every status, content type, header and body is one
# the document gives. Left out: whether it accepts all schema-valid data and refuses all
# invalid data, since a JSON Schema cannot say all that taskd checks (delay or run_at, not
# both; a task's own payload type; integers a task can receive).
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
]
MAX_EXAMPLES = 10  # per operation and phase: about 450 requests in all, 5 s here
SEED = 15


def test_the_shipped_document_is_the_one_the_types_give() -> None:
    assert json.loads(SHIPPED.read_text()) == openapi_schema(), "run `make schema` and commit it"


def test_every_error_code_has_a_status() -> None:
    assert set(STATUS_FOR_CODE) == set(ErrorCode) | set(HttpErrorCode)
    assert all(400 <= status <= 599 for status in STATUS_FOR_CODE.values())


def test_taskd_serves_the_document(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=http_config()).start()
    reply = HttpClient.of(daemon).get("/openapi.json")
    assert reply.status == 200 and reply.json() == openapi_schema()


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is not installed")
def test_schemathesis_finds_no_server_error(
    taskd_factory: type[Taskd], short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = taskd_factory(config=http_config(), log_level="info").start()
    port = HttpClient.of(daemon).port
    report = short_tmp / "schemathesis"
    run = subprocess.run(
        [
            SCHEMATHESIS, "run", f"http://127.0.0.1:{port}/openapi.json",
            "--header", f"Authorization: Bearer {TOKEN}",
            "--checks", ",".join(CHECKS),
            "--max-examples", str(MAX_EXAMPLES),
            "--seed", str(SEED),
            "--workers", "1",
            # A stream of events never ends by itself: tests/e2e/test_http_events.py reads it.
            "--exclude-path", "/events",
            "--report-dir", str(report),
        ],
        capture_output=True, text=True, timeout=300, cwd=short_tmp,
    )  # fmt: skip
    shutil.rmtree(report, ignore_errors=True)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert daemon.running and "Traceback" not in daemon.log, daemon.log
    summary = output[output.rfind("\n", 0, output.rindex("SUMMARY")) :]
    with capsys.disabled():  # the summary the issue asks for, in the test output
        print("\nschemathesis against /openapi.json:\n" + summary.rstrip())
