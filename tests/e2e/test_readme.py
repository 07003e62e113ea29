"""The README's Quick start and its Python examples run as written against `make run`'s daemon.

They are read out of README.md itself, so that a change to the manual that breaks one of
them fails here. The daemon is the one `make run` starts (taskd on
contrib/examples/taskd.toml), in a copy of the checkout's layout in a temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import short_tempdir

ROOT = Path(__file__).parent.parent.parent
README = (ROOT / "README.md").read_text()
VENV = Path(sys.prefix)


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


@pytest.fixture(scope="module")
def checkout() -> Iterator[Path]:
    """A folder laid out like the checkout, with `make run`'s daemon running in it."""
    root = short_tempdir()
    shutil.copytree(ROOT / "contrib" / "examples", root / "contrib" / "examples")
    (root / ".venv").symlink_to(VENV)
    with open(root / "taskd.log", "wb") as log:
        daemon = subprocess.Popen(
            [VENV / "bin" / "taskd", "--config", "contrib/examples/taskd.toml"],
            cwd=root, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        ready = subprocess.run(
            [VENV / "bin" / "taskctl", "--socket", ".run/taskd.sock", "--connect-timeout", "30s",
             "status"],
            cwd=root, capture_output=True, text=True,
        )  # fmt: skip
        assert ready.returncode == 0, ready.stderr + (root / "taskd.log").read_text()
        yield root
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0, (root / "taskd.log").read_text()
        shutil.rmtree(root, ignore_errors=True)


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


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _names(table: str) -> list[str]:
    return [line.split()[0] for line in table.strip().splitlines()[1:]]
