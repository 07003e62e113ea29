"""The README's commands and examples run as written against `make run`'s daemon.

They are read out of README.md itself, so that a change to the manual that breaks one of
them fails here. The daemon is the one `make run` starts (contrib/examples/run.py, taskd on
contrib/examples/taskd.toml), in a copy of the checkout's layout in a temporary folder.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from taskd.config import load_config
from tests.support import short_tempdir, wait_until

ROOT = Path(__file__).parent.parent.parent
README = (ROOT / "README.md").read_text()
VENV = Path(sys.prefix)
SHOWN_CHECKOUT = "/home/ada/taskd"  # where the README's samples were made


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.S | re.M)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    return README[start : README.index("\n## ", start + 1)]


def quick_start() -> list[str]:
    """The Quick start's commands, without `make run` (the fixture starts its daemon)."""
    (block,) = re.findall(r"^```sh\n(.*?)^```$", section("Quick start"), flags=re.S | re.M)
    lines = [line for line in block.splitlines() if line.strip()]
    return [line for line in lines if line != "make run" and not line.startswith("#")]


class MakeRun(NamedTuple):
    """`make run`'s daemon: the checkout it runs in, and what `make run` printed."""

    root: Path
    printed: str


@pytest.fixture(scope="module")
def make_run() -> Iterator[MakeRun]:
    """`make run` (contrib/examples/run.py) in a folder laid out like the checkout, until
    it says that taskd is running."""
    root = short_tempdir()
    shutil.copytree(ROOT / "contrib" / "examples", root / "contrib" / "examples")
    (root / ".venv").symlink_to(VENV)
    log = root / "taskd.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [root / ".venv" / "bin" / "python", "contrib/examples/run.py"], cwd=root,
            stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, "TZ": "UTC"},
        )  # fmt: skip
    try:
        assert process.stdout is not None
        printed = ""
        for line in process.stdout:  # until `make run` ends, if it does
            printed += line
            if line.startswith("Ctrl-C stops it."):
                break
        assert "taskd is running" in printed, printed + log.read_text()
        yield MakeRun(root, printed)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
        if process.stdout is not None:
            process.stdout.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def checkout(make_run: MakeRun) -> Path:
    """The folder `make run`'s daemon runs in."""
    return make_run.root


def test_make_run_prints_what_the_readme_shows(make_run: MakeRun) -> None:
    (shown,) = re.findall(r"^`make run` prints, for example:\n\n```\n(.*?)^```$", README,
                          flags=re.S | re.M)  # fmt: skip
    printed = make_run.printed.replace(str(make_run.root), SHOWN_CHECKOUT)
    commands = [line for line in printed.splitlines() if line.startswith("$ ")]
    assert commands == ["$ taskctl list", f"$ taskctl run jobs:send-email --payload '{EMAIL}'"]
    assert normalized(printed) == normalized(shown)


def test_the_quick_start_runs_as_written(checkout: Path) -> None:
    commands = quick_start()
    assert any("--payload @email.json" in command for command in commands)
    script = "set -euo pipefail\n" + "\n".join(
        f"echo '$ '{_quoted(command)}\n{command}" for command in commands
    )
    environment = {k: v for k, v in os.environ.items() if k != "TASKD_SOCKET"}
    done = subprocess.run(
        ["bash", "-c", script], cwd=checkout, capture_output=True, text=True, env=environment
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"greeting":"Hello, world!"' in done.stdout
    assert '"greeting":"Hello, Ada!"' in done.stdout
    # What the README shows `make run` printing lists the tasks taskctl lists.
    shown = section("Quick start").split("$ taskctl list\n", 1)[1].split("\n\n", 1)[0]
    listed = done.stdout.split("$ taskctl list\n", 1)[1].split("$ ", 1)[0]
    assert _names(shown) == _names(listed)


def test_the_python_examples_run_as_written(checkout: Path) -> None:
    examples = blocks("python")
    client_examples = [code for code in examples if "from taskctl import" in code]
    assert client_examples
    environment = {**os.environ, "TASKD_SOCKET": str(checkout / ".run" / "taskd.sock")}
    for code in client_examples:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True,
            env=environment, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, f"{code}\n{done.stdout}{done.stderr}"
        assert "Hello, world!" in done.stdout


def test_the_task_file_example_is_a_working_task(tmp_path: Path) -> None:
    (code,) = [code for code in blocks("python") if "@define_task" in code]
    first = code.splitlines()[0]
    assert first.startswith("# tasks/"), first
    path = tmp_path / first.removeprefix("# ")
    path.parent.mkdir(parents=True)
    path.write_text(code)
    checked = subprocess.run(
        [VENV / "bin" / "taskd", "--check", "--tasks", str(tmp_path / "tasks")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "jobs:send-email" in checked.stdout


@pytest.fixture(scope="module")
def http_checkout() -> Iterator[tuple[Path, str, str]]:
    """`make run`'s daemon with an [http] table: its folder, its URL and its token."""
    root = short_tempdir()
    shutil.copytree(ROOT / "contrib" / "examples", root / "contrib" / "examples")
    token = secrets.token_hex(32)
    examples = root / "contrib" / "examples"
    http = f'\n[http]\nlisten = "127.0.0.1:0"\ntokens = ["{token}"]\n'
    (examples / "taskd-http.toml").write_text((examples / "taskd.toml").read_text() + http)
    log = root / "taskd.log"
    with open(log, "wb") as output:
        daemon = subprocess.Popen(
            [VENV / "bin" / "taskd", "--config", "contrib/examples/taskd-http.toml"],
            cwd=root, stdout=subprocess.DEVNULL, stderr=output,
        )  # fmt: skip
    try:
        found = wait_until(
            lambda: re.search(r"HTTP API listening on (http://127.0.0.1:\d+)", log.read_text()),
            timeout=30, what="taskd's HTTP listener",
        )  # fmt: skip
        yield root, found.group(1), token
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0, log.read_text()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_examples_run_as_written(http_checkout: tuple[Path, str, str]) -> None:
    root, url, token = http_checkout
    (block,) = re.findall(r"^```sh\n(.*?)^```$", section("HTTP API"), flags=re.S | re.M)
    assert "TOKEN=" in block and "URL=" in block
    commands = "\n".join(
        line for line in block.splitlines() if not line.startswith(("TOKEN=", "URL="))
    )
    script = (
        f"set -euo pipefail\nTOKEN={token}\nURL={url}\n"
        'curl() { command curl --fail-with-body "$@"; echo; }\n' + commands
    )
    done = subprocess.run(["bash", "-c", script], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for expected in (
        '"scheduledTasks":[',
        '{"result":{"greeting":"Hello, Ada!"',
        '{"result":{"result":"success","sent_at":',
        '"duplicate":false}',
        '{"jobs":[{"id":',
        '{"id":1,"task":"hello"',
        '{"status":"ok","message":null}',
        'taskd_jobs{status="succeeded",task="jobs:send-email"} 1.0',
    ):
        assert expected in done.stdout, (expected, done.stdout)


def test_the_configuration_block_is_a_valid_configuration(tmp_path: Path) -> None:
    (block,) = re.findall(r"^```toml\n(.*?)^```$", section("taskd"), flags=re.S | re.M)
    assert "[http]" in block
    (tmp_path / "taskd.toml").write_text(block)
    config, _ = load_config(tmp_path / "taskd.toml")
    assert config.http is not None and config.http.listen == "127.0.0.1:8080"


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _names(table: str) -> list[str]:
    return [line.split()[0] for line in table.strip().splitlines()[1:]]


EMAIL = '{"to": "ada@example.com", "subject": "Hello", "body": "Welcome!"}'  # run.py's

# What differs from one run to the next, made alike in samples and real output, in order.
VARYING = [
    (r"\b[\w.]+(-[\w.]+)*-[0-9a-f]{8}(/\d+)?\b", "NODE"),  # node (host-digest) and worker
    (r"(\d{4}-\d\d-\d\d[T ])?\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?", "TIME"),
    (r"\d{4}-\d\d-\d\d", "DATE"),
    (r"\b\d+(\.\d+)?(ms|s|m|h|d)(\d+(s|m|h))?\b", "DURATION"),
    (r"\((now|in DURATION|DURATION ago)\)", "(WHEN)"),
    (r"\d+(\.\d+)?", "N"),
]


def normalized(text: str) -> list[str]:
    """Output as a sample shows it: times, durations, numbers and node names made alike,
    and runs of spaces (a table's column widths) made one."""
    for pattern, placeholder in VARYING:
        text = re.sub(pattern, placeholder, text)
    return [" ".join(line.split()) for line in text.strip().splitlines()]
