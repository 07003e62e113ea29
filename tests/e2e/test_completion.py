"""`taskctl completion bash` loads in bash and completes commands, options, task names, job
ids and schedule ids (the last from the running taskd)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import Taskd

BASH = shutil.which("bash")


def bash_complete(daemon: Taskd, *words: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for the last of `words` after sourcing taskctl's completion."""
    script = (
        "source <(taskctl completion bash)\n"
        f"COMP_WORDS=({shlex.join(('taskctl', *words))}); COMP_CWORD={len(words)}; _taskctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = _bash(daemon, script, cwd)
    return [line for line in done.splitlines() if line]


def _bash(daemon: Taskd, script: str, cwd: Path | None = None) -> str:
    path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    environment = {**os.environ, "PATH": path, "TASKD_SOCKET": str(daemon.socket)}
    done = subprocess.run([BASH or "bash", "-c", script], capture_output=True, text=True,
                          env=environment, timeout=30, cwd=cwd)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_bash_completes_commands_options_and_what_taskd_knows(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='[scheduled_tasks]\n"@daily" = "echo"\n').start()
    job_id = daemon.ctl("enqueue", "echo", "--delay", "1h").stdout.strip()
    assert bash_complete(daemon, "ru") == ["run"]
    assert bash_complete(daemon, "run", "--de") == ["--detach"]
    assert bash_complete(daemon, "run", "em") == ["email"]
    assert bash_complete(daemon, "--socket", str(daemon.socket), "enqueue", "ec") == ["echo"]
    assert bash_complete(daemon, "cancel", "") == [job_id]
    assert bash_complete(daemon, "jobs", "--status", "f") == ["failed"]
    assert bash_complete(daemon, "jobs", "--task", "ec") == ["echo"]
    assert bash_complete(daemon, "schedules", "") == ["pause", "resume", "trigger"]
    assert bash_complete(daemon, "schedules", "pause", "@") == ["@daily"]
    assert bash_complete(daemon, "completion", "") == ["bash", "fish", "zsh"]
    daemon.stop()
    assert bash_complete(daemon, "run", "e") == []  # no taskd: nothing, and no error


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_bash_inserts_a_schedule_id_quoted(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    daemon = taskd_factory(config='[scheduled_tasks]\n"*/5 * * * *" = "echo"\n').start()
    (short_tmp / "a b").mkdir()  # what `*/5 * * * *` would match, unquoted, in this folder
    (short_tmp / "a b" / "5").touch()
    for typed in ("", "*", "'*/5 *"):
        (completed,) = bash_complete(daemon, "schedules", "pause", typed, cwd=short_tmp)
        assert completed == "'*/5 * * * *'", typed
        # The line as bash has completed it gives taskctl the id as one argument.
        arguments = _bash(daemon, f"printf '%s\\n' {completed}", cwd=short_tmp)
        assert arguments == "*/5 * * * *\n"
    assert bash_complete(daemon, "completion", "ba") == ["bash"]  # plain words stay plain


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_other_shells_scripts_parse(shell: str) -> None:
    binary = shutil.which(shell)
    if binary is None:
        pytest.skip(f"{shell} is not installed")
    script = subprocess.run([sys.executable, "-m", "taskctl", "completion", shell],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    checked = subprocess.run([binary, "-n"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
