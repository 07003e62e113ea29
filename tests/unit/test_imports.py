"""taskctl must start fast: it loads the wire protocol, never the daemon's machinery."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = {"asyncio", "uvloop", "aiosqlite", "sqlite3", "croniter", "logging", "concurrent.futures",
         "prometheus_client", "h11"}  # fmt: skip
# What taskctl does without, to start in a few milliseconds: the socket module (the C one
# serves), shutil (argparse's width), the task API.
AVOIDED = {"socket", "shutil", "selectors", "taskd.definition", "opentelemetry"}
# taskd.traceparent: the W3C traceparent a client sends (standard library only).
ALLOWED_TASKD = {"taskd", "taskd.protocol", "taskd.models", "taskd.traceparent"}


def loaded_modules(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return set(json.loads(output.stdout))


def test_taskctl_cli_imports_only_the_protocol() -> None:
    modules = loaded_modules("import taskctl.cli; taskctl.cli.build_parser('list')")
    assert not (HEAVY | AVOIDED) & modules, (HEAVY | AVOIDED) & modules
    assert {m for m in modules if m.split(".")[0] == "taskd"} <= ALLOWED_TASKD


def test_a_plain_command_line_is_read_without_argparse() -> None:
    modules = loaded_modules(
        "from taskctl import cli; cli.plain_args.read(['list'], cli.COMMANDS, cli.GLOBAL_OPTIONS)"
    )
    assert "taskctl.cli" in modules and not {"argparse", "gettext", "locale"} & modules


def test_task_api_is_cheap_to_import() -> None:
    modules = loaded_modules("from taskd import define_task, TaskContext, Retry, Fail")
    assert not HEAVY & modules, HEAVY & modules


def test_async_client_is_loaded_on_demand() -> None:
    assert "asyncio" not in loaded_modules("import taskctl")
    assert "taskctl.aio" in loaded_modules("from taskctl import AsyncClient")


def test_the_daemon_loads_the_http_library_only_with_an_http_table() -> None:
    modules = loaded_modules("import taskd.cli, taskd.daemon")
    assert "h11" not in modules
    assert not {"taskd.http.server", "taskd.http.routes"} & modules
    assert "h11" in loaded_modules("import taskd.http.server")
