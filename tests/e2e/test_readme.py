"""The manual's commands and examples run as written against `make run`'s daemon: every
block of README.md, and every example of taskctl's --help texts.

They are read out of README.md and taskctl's parser themselves, so that a change to the
manual that breaks one of them fails here. The daemon is the one `make run` starts
(contrib/examples/run.py, taskd on contrib/examples/taskd.toml), in a copy of the
checkout's layout in a temporary folder. A README block that does not run against it (a
systemd set-up, a synopsis) says why in NOT_RUN; a new block must be run here or be listed
there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from taskctl.cli import build_parser
from taskd.config import load_config, resolve_paths
from tests.e2e.test_progress import Output, Screen, terminal
from tests.support import short_tempdir, wait_until

ROOT = Path(__file__).parent.parent.parent
README = (ROOT / "README.md").read_text()
VENV = Path(sys.prefix)
SHOWN_CHECKOUT = "/home/ada/taskd"  # where the README's samples were made
EMAIL = '{"to": "ada@example.com", "subject": "Hello", "body": "Welcome!"}'  # run.py's


class Block(NamedTuple):
    """A fenced block of README.md: its language (`""` for output), its text (unindented)
    and the `##` section and `###` subsection it is in."""

    language: str
    text: str
    section: str
    subsection: str

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0]


def readme_blocks() -> list[Block]:
    found = []
    section = subsection = ""
    fence = re.compile(r"^( *)```(\w*)\n(.*?)^\1```$", flags=re.S | re.M)
    position = 0
    for match in fence.finditer(README):
        for heading in re.findall(r"^(##+) (.*)$", README[position : match.start()], re.M):
            if heading[0] == "##":
                section, subsection = heading[1], ""
            else:
                subsection = heading[1]
        position = match.end()
        indent = len(match.group(1))
        text = "".join(line[indent:] for line in match.group(3).splitlines(keepends=True))
        found.append(Block(match.group(2), text, section, subsection))
    return found


BLOCKS = readme_blocks()

# README blocks that are not run against make run's daemon, by the start of their first
# line, and why.
NOT_RUN = {
    "make run    # creates .venv": "make run is this module's fixture, and make test runs it",
    "import taskd.outbox": "an application's transaction (tests/store/test_postgres.py)",
    "taskctl [--socket PATH]": "a synopsis",
    "taskd [--config FILE]": "a synopsis",
    "# taskd in a virtual environment of its own": "sets up the system service: root, systemd",
    "taskctl list                     # finds /run/taskd": "the system service's",
    "python3 -m venv ~/.local/share/taskd/venv": "sets up a per-user service: systemd",
    "[Service]": "a systemd drop-in; tests/e2e/test_tracing.py sets the same variables",
    "# the receiving end: check X-Taskd-Signature": "a receiver's code; tests/e2e/"
    "test_webhooks.py checks the signatures taskd sends the same way",
}


def not_run(block: Block) -> str | None:
    return next((why for start, why in NOT_RUN.items() if block.first_line.startswith(start)), None)


def checked_by(block: Block) -> str | None:
    """The test that runs or checks a README block."""
    if block.language == "toml":
        return "test_the_toml_blocks_are_configurations"
    if block.language == "python" and "from taskctl import" in block.text:
        return "test_the_python_examples_run_as_written"
    if block.language == "python" and "on_failure=" in block.text:
        return "test_the_hook_example_is_working_tasks"
    if block.language == "python" and "@define_task" in block.text:
        return "test_the_task_file_example_is_a_working_task"
    if block.subsection == "Your own tasks":
        return "test_your_own_tasks_run_as_written"
    if block.section == "Quick start" and block.language == "sh":
        return "test_the_quick_start_runs_as_written"
    if block.section == "Quick start" and block.first_line == "$ taskctl list":
        return "test_make_run_prints_what_the_readme_shows"
    if block.section == "Dashboard" and block.language == "sh":
        return "test_the_dashboard_example_runs_as_written"
    if block.language == "sh" and "curl " in block.text:
        return "test_the_curl_examples_run_as_written"
    if block.language == "" and re.match(r"taskd \S+ on ", block.first_line):
        return "test_the_top_screen_is_taskctl_tops"
    if block.language == "" and block.first_line.startswith("$ "):
        return "test_the_transcripts_run_as_written"
    if block.language == "sh" and not_run(block) is None:
        return "test_the_shell_blocks_run_as_written"
    return None


def checked(test: str) -> list[Block]:
    return [block for block in BLOCKS if checked_by(block) == test]


def test_every_block_is_run_or_says_why_not() -> None:
    unaccounted = [
        block.first_line for block in BLOCKS if checked_by(block) is None and not_run(block) is None
    ]
    assert unaccounted == [], "run these README blocks in a test, or say in NOT_RUN why not"
    for start in NOT_RUN:  # no stale entries
        assert any(block.first_line.startswith(start) for block in BLOCKS), start
    for test in {checked_by(block) for block in BLOCKS} - {None}:
        assert test in globals(), test


# -- make run -----------------------------------------------------------------------------


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


def shell(root: Path) -> dict[str, str]:
    """The environment of the Quick start's second shell, in the zone the samples show."""
    environment = {k: v for k, v in os.environ.items() if k != "TASKD_SOCKET"}
    return {
        **environment,
        "TASKD_SOCKET": str(root / ".run" / "taskd.sock"),
        "PATH": f"{root / '.venv' / 'bin'}:{environment['PATH']}",
        "TZ": "UTC",
    }


def bash(command: str, root: Path, *, merged: bool = True) -> subprocess.CompletedProcess[str]:
    """A command as the Quick start's second shell runs it; its stderr in its stdout unless
    not `merged`."""
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], cwd=root, env=shell(root), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        timeout=120,
    )  # fmt: skip


def test_make_run_prints_what_the_readme_shows(make_run: MakeRun) -> None:
    (block,) = checked("test_make_run_prints_what_the_readme_shows")
    printed = make_run.printed.replace(str(make_run.root), SHOWN_CHECKOUT)
    commands = [line for line in printed.splitlines() if line.startswith("$ ")]
    assert commands == ["$ taskctl list", f"$ taskctl run jobs:send-email --payload '{EMAIL}'"]
    assert normalized(printed) == normalized(block.text)


def test_the_quick_start_runs_as_written(checkout: Path) -> None:
    (block,) = checked("test_the_quick_start_runs_as_written")
    lines = [line for line in block.text.splitlines() if line.strip()]
    commands = [line for line in lines if line != "make run" and not line.startswith("#")]
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


# -- transcripts: `$ command` and its output ----------------------------------------------

# What differs from one run to the next, made alike in samples and real output, in order.
VARYING = [
    (r"\b[\w.]+(-[\w.]+)*-[0-9a-f]{8}(/\d+)?\b", "NODE"),  # node (host-digest) and worker
    (r"(\d{4}-\d\d-\d\d[T ])?\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?", "TIME"),
    (r"\d{4}-\d\d-\d\d", "DATE"),
    (r"\b\d+(\.\d+)?(ms|s|m|h|d)(\d+(s|m|h))?\b", "DURATION"),
    (r"\((now|in DURATION|DURATION ago)\)", "(WHEN)"),
    (r"\d+(\.\d+)?", "N"),
]
# Job ids in output: taskctl enqueue's and run --detach's line, `job N`, a result's "job".
JOB_IDS = re.compile(r"^(\d+)$|\bjob (\d+)\b|\"job\":(\d+)", flags=re.M)
# Arguments that are job ids.
JOB_ARGUMENTS = re.compile(r"(\btaskctl (?:job|logs|why|wait|cancel|retry|batch) |--after )(\d+)\b")
# What `run` and `wait` print on stderr of a job's progress where it is no terminal; on a
# terminal it is a bar, redrawn in place and cleared at the end, as the samples show it.
PROGRESS_LINE = re.compile(r"^\d+(\.\d+)?(/\d+(\.\d+)?)?( .*)?$")


def normalized(text: str) -> list[str]:
    """Output as a sample shows it: times, durations, numbers and node names made alike,
    and runs of spaces (a table's column widths) made one."""
    for pattern, placeholder in VARYING:
        text = re.sub(pattern, placeholder, text)
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def transcript(text: str) -> list[tuple[str, str]]:
    """The commands of a sample, each with the output shown under it."""
    steps: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], ""))
        else:
            command, output = steps[-1]
            steps[-1] = (command, output + line + "\n")
    return steps


def job_ids(text: str) -> list[str]:
    return [next(group for group in match.groups() if group) for match in JOB_IDS.finditer(text)]


@pytest.mark.parametrize(
    "block",
    checked("test_the_transcripts_run_as_written"),
    ids=lambda block: f"{block.section}: {block.first_line}",
)
def test_the_transcripts_run_as_written(checkout: Path, block: Block) -> None:
    """Each command runs (with the ids of the jobs it made, not the sample's) and prints
    what the sample shows, but for times, numbers and node names."""
    ids: dict[str, str] = {}  # the sample's job ids: this run's
    for command, shown in transcript(block.text):
        ran = JOB_ARGUMENTS.sub(lambda m: m.group(1) + ids[m.group(2)], command)
        waits = re.match(r"taskctl (run|wait) ", command) is not None
        done = bash(ran, checkout, merged=not waits)
        output = done.stdout
        if waits:  # what it says on the way (stderr), then the result (stdout)
            said = done.stderr.splitlines(keepends=True)
            output = "".join(line for line in said if not PROGRESS_LINE.match(line)) + output
        assert done.returncode == 0, f"$ {ran}\n{output}"
        assert normalized(output) == normalized(shown), f"$ {ran}\n{output}"
        ids.update(zip(job_ids(shown), job_ids(output), strict=True))


def test_the_shell_blocks_run_as_written(checkout: Path) -> None:
    blocks = checked("test_the_shell_blocks_run_as_written")
    assert any("taskctl schedules" in block.text for block in blocks)
    for block in blocks:
        done = bash("set -eu\n" + block.text, checkout)
        assert done.returncode == 0, block.text + done.stdout


def test_the_top_screen_is_taskctl_tops() -> None:
    """A screen of `taskctl top` (test_progress and the --help examples below drive top on a
    terminal): it fits on 80 columns, as top cuts its lines there."""
    (block,) = checked("test_the_top_screen_is_taskctl_tops")
    lines = block.text.splitlines()
    assert all(len(line) < 80 for line in lines), [line for line in lines if len(line) >= 80]
    assert re.fullmatch(
        r"\d+ running, \d+ pending, \d+ workers +\d\d:\d\d:\d\d +\(q quits\)", lines[1]
    )
    headings = [line for line in lines if line.isupper()]
    assert headings == ["RUNNING", "QUEUE", "RECENT FAILURES", "NEXT TICKS"]


# -- your own tasks -----------------------------------------------------------------------


def test_your_own_tasks_run_as_written(short_tmp: Path) -> None:
    start, then = (block.text for block in checked("test_your_own_tasks_run_as_written"))
    *setup, daemon = start.splitlines()
    assert daemon.startswith("taskd "), daemon  # it runs in the foreground: started here
    environment = {k: v for k, v in os.environ.items() if k != "TASKD_SOCKET"}
    environment["PATH"] = f"{VENV / 'bin'}:{environment['PATH']}"
    script = "\n".join(["set -eu", *setup, f"exec {daemon}"])
    with open(short_tmp / "taskd.log", "wb") as log:
        taskd = subprocess.Popen(["bash", "-c", script], cwd=short_tmp, env=environment,
                                 stdout=log, stderr=log)  # fmt: skip
    folder = short_tmp / "my-tasks"
    try:
        wait_until(lambda: (folder / "taskd.sock").exists() or taskd.poll() is not None,
                   timeout=30, what="taskd's socket")  # fmt: skip
        done = subprocess.run(["bash", "-c", "set -eu\n" + then], cwd=folder, env=environment,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, (
            done.stdout + done.stderr + (short_tmp / "taskd.log").read_text()
        )
        assert '{"greeting":"Hello, Ada!"}' in done.stdout
        assert (folder / "taskd.db").exists()
    finally:
        taskd.terminate()
        assert taskd.wait(30) == 0, (short_tmp / "taskd.log").read_text()


def test_what_plain_taskd_uses_is_what_the_readme_says(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    said = README[README.index("\n### Your own tasks\n") : README.index("\n## Writing tasks\n")]
    for name in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "TASKD_SOCKET", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    for uid, database, socket in (
        (1000, "~/.local/state/taskd/taskd.db", "$XDG_RUNTIME_DIR/taskd/taskd.sock"),
        (0, "/var/lib/taskd/taskd.db", "/run/taskd/taskd.sock"),
    ):
        monkeypatch.setattr(os, "getuid", lambda uid=uid: uid)
        config, base = load_config(None)
        paths = resolve_paths(config, base)
        assert paths.tasks == Path.cwd() / "tasks"
        home = str(tmp_path)
        assert paths.database == "sqlite://" + database.replace("~", home, 1)
        assert str(paths.socket) == socket.replace("$XDG_RUNTIME_DIR", "/run/user/1000")
        assert f"`{database}`" in said and f"`{socket}`" in said


# -- Python and TOML ----------------------------------------------------------------------


def test_the_python_examples_run_as_written(checkout: Path) -> None:
    examples = checked("test_the_python_examples_run_as_written")
    assert examples
    environment = {**os.environ, "TASKD_SOCKET": str(checkout / ".run" / "taskd.sock")}
    for example in examples:
        done = subprocess.run(
            [sys.executable, "-c", example.text], cwd=checkout, capture_output=True, text=True,
            env=environment, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, f"{example.text}\n{done.stdout}{done.stderr}"
        assert "Hello, world!" in done.stdout


def test_the_task_file_example_is_a_working_task(tmp_path: Path) -> None:
    (example,) = checked("test_the_task_file_example_is_a_working_task")
    assert example.first_line.startswith("# tasks/"), example.first_line
    path = tmp_path / example.first_line.removeprefix("# ")
    path.parent.mkdir(parents=True)
    path.write_text(example.text)
    checked_file = subprocess.run(
        [VENV / "bin" / "taskd", "--check", "--tasks", str(tmp_path / "tasks")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert checked_file.returncode == 0, checked_file.stderr
    assert "jobs:send-email" in checked_file.stdout


def test_the_hook_example_is_working_tasks(tmp_path: Path) -> None:
    """The task hooks example: two task files, the first naming the second its hook."""
    (example,) = checked("test_the_hook_example_is_working_tasks")
    for part in re.split(r"^(?=# tasks/)", example.text, flags=re.M):
        if part.strip():
            path = tmp_path / part.splitlines()[0].removeprefix("# ")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(part)
    checked_files = subprocess.run(
        [VENV / "bin" / "taskd", "--check", "--tasks", str(tmp_path / "tasks")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert checked_files.returncode == 0, checked_files.stderr
    assert "reports:build" in checked_files.stdout and "alerts:notify" in checked_files.stdout


def test_the_toml_blocks_are_configurations(tmp_path: Path) -> None:
    blocks = checked("test_the_toml_blocks_are_configurations")
    assert len(blocks) >= 4
    for block in blocks:
        (tmp_path / "taskd.toml").write_text(block.text)
        config, _ = load_config(tmp_path / "taskd.toml")  # or ConfigError, saying what is wrong
        if block.section == "taskd":  # the whole configuration
            assert config.http is not None and config.http.listen == "127.0.0.1:8080"


def test_the_payload_message_the_readme_quotes_is_taskds(checkout: Path) -> None:
    # Only taskd's part: what follows it is msgspec's wording, which is not taskd's to keep.
    (quoted, task) = re.findall(r"``(payload rejected by task (\S+): )", README)[0]
    payload = '{"to": 5, "subject": "Hi", "body": "Welcome!"}'
    done = bash(f"taskctl run {task} --payload '{payload}'", checkout)
    assert done.returncode == 65 and done.stdout.startswith(f"taskctl: {quoted}"), done.stdout


# -- HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_checkout() -> Iterator[tuple[Path, str, str]]:
    """`make run`'s daemon with the README's [http] table, its token made by the README's
    commands as they are given for a taskd that runs as you: its folder, URL and token."""
    root = short_tempdir()
    shutil.copytree(ROOT / "contrib" / "examples", root / "contrib" / "examples")
    (block,) = checked("test_the_curl_examples_run_as_written")
    setup = block.text.split("\nURL=", 1)[0]
    mine = setup.replace("sudo ", "").replace(" -g taskd", "")
    mine = mine.replace("/etc/taskd/http-tokens", str(root / "http-tokens"))
    assert mine.count(str(root)) == 1 and "sudo" not in mine, mine
    made = subprocess.run(["bash", "-euc", mine + '\necho "$TOKEN"'], capture_output=True,
                          text=True, check=True)  # fmt: skip
    token = made.stdout.split()[-1]
    (http,) = [b.text for b in BLOCKS if b.section == "HTTP API" and b.language == "toml"]
    table = http.replace('"127.0.0.1:8080"', '"127.0.0.1:0"')
    table = table.replace("/etc/taskd/http-tokens", str(root / "http-tokens"))
    examples = root / "contrib" / "examples"
    config = (examples / "taskd.toml").read_text() + "\n" + table
    (examples / "taskd-http.toml").write_text(config)
    log = root / "taskd.log"
    with open(log, "wb") as output:
        daemon = subprocess.Popen(
            [VENV / "bin" / "taskd", "--config", "contrib/examples/taskd-http.toml"],
            cwd=root, stdout=subprocess.DEVNULL, stderr=output,
        )  # fmt: skip
    try:
        found = wait_until(
            lambda: re.search(r"HTTP API listening on (http://127.0.0.1:\d+)", log.read_text())
            or daemon.poll() is not None,
            timeout=30, what="taskd's HTTP listener",
        )  # fmt: skip
        assert daemon.poll() is None, log.read_text()
        yield root, found.group(1), token
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0, log.read_text()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_examples_run_as_written(http_checkout: tuple[Path, str, str]) -> None:
    root, url, token = http_checkout
    (block,) = checked("test_the_curl_examples_run_as_written")
    commands = block.text.split("\nURL=", 1)[1].split("\n", 1)[1]
    script = (
        f"set -euo pipefail\nTOKEN={token}\nURL={url}\n"
        'curl() { command curl --fail-with-body "$@"; echo; }\n' + commands
    )
    done = subprocess.run(["bash", "-c", script], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (health,) = re.findall(r"^\| `GET /healthz` \| 200 `(.*?)`", README, flags=re.M)
    for expected in (
        '"scheduledTasks":[',
        '{"result":{"greeting":"Hello, Ada!"',
        '{"result":{"result":"success","sent_at":',
        '"duplicate":false}',
        '{"jobs":[{"id":',
        '{"id":1,"task":"hello"',
        health,
        'taskd_jobs{status="succeeded",task="jobs:send-email"} 1.0',
    ):
        assert expected in done.stdout, (expected, done.stdout)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_dashboard_example_runs_as_written(http_checkout: tuple[Path, str, str]) -> None:
    root, url, token = http_checkout
    (block,) = checked("test_the_dashboard_example_runs_as_written")
    script = f"set -euo pipefail\nTOKEN={token}\nURL={url}\n" + block.text
    done = subprocess.run(["bash", "-c", script], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (said,) = re.findall(r"^prints `(.*)`\.$", README[README.index("\n## Dashboard\n") :], re.M)
    assert done.stdout.strip() == said
    assert "HttpOnly" in (root / "cookies.txt").read_text()


# -- taskctl's --help examples ------------------------------------------------------------


def help_examples() -> list[str]:
    """Every example of taskctl's --help texts, as printed."""
    examples: list[str] = []
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop(0)
        found = re.search(r"^examples?:\n((?:  .*\n)+)", parser.format_help(), flags=re.M)
        if found:
            examples += [line.strip() for line in found.group(1).splitlines()]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    return list(dict.fromkeys(examples))


def job_for(example: str, root: Path) -> str:
    """A job id that suits the example: one to cancel, one to retry, else a finished one;
    for `taskctl batch`, a batch's id."""
    if example.startswith("taskctl batch"):
        made = bash("echo '{}' | taskctl enqueue hello --each - --on-finish hello", root)
        return made.stdout.strip()
    if re.match(r"taskctl (cancel|retry) ", example):
        job_id = bash("taskctl enqueue hello --delay 1h", root).stdout.strip()
        if example.startswith("taskctl retry"):
            bash(f"taskctl cancel {job_id}", root)
        return job_id
    listed = bash("taskctl --json jobs --status succeeded --task jobs:send-email --limit 1", root)
    return str(json.loads(listed.stdout)[0]["id"])


@pytest.mark.parametrize("example", help_examples())
def test_the_help_examples_run_against_make_runs_daemon(checkout: Path, example: str) -> None:
    shell_name = "zsh" if "zsh" in example else "fish" if "| source" in example else "bash"
    if shutil.which(shell_name) is None:
        pytest.skip(f"{shell_name} is not installed")
    command = re.sub(r"\b42\b", lambda _: job_for(example, checkout), example)
    if "@email.json" in command:  # the file the Quick start writes
        (checkout / "email.json").write_text(EMAIL)
    if command == "taskctl top":
        assert _quits_with_q(command, checkout)
    elif "--watch" in command:
        _shows_then_stops_on_ctrl_c(command, checkout)
    else:
        done = subprocess.run([shell_name, "-c", command], cwd=checkout, env=shell(checkout),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    if (paused := re.match(r"taskctl schedules pause (.*)", command)) is not None:
        assert bash(f"taskctl schedules resume {paused.group(1)}", checkout).returncode == 0
    if (paused := re.match(r"taskctl pause (.*)", command)) is not None:
        assert bash(f"taskctl resume {paused.group(1)}", checkout).returncode == 0


def _quits_with_q(command: str, root: Path) -> bool:
    """Run a full-screen command on an 80x24 terminal until it shows `(q quits)`, then
    press q."""
    with terminal(rows=24, columns=80) as (controller, term):
        process = subprocess.Popen(["bash", "-c", command], cwd=root, stdin=term, stdout=term,
                                   stderr=term, env={**shell(root), "TERM": "vt100"})  # fmt: skip
        Output(controller).until("(q quits)", timeout=30, screen=Screen(24, 80))
        os.write(controller, b"q")
        return process.wait(30) == 0


def _shows_then_stops_on_ctrl_c(command: str, root: Path) -> None:
    with subprocess.Popen(shlex.split(command), cwd=root, env=shell(root), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:  # fmt: skip
        assert process.stdout is not None
        assert "jobs (Ctrl-C to stop)" in process.stdout.readline()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
