"""Plain command lines are read without argparse (taskctl.plain_args), into exactly what
argparse's parser makes of them; all others are left to argparse."""

from __future__ import annotations

import pytest

from taskctl.cli import COMMANDS, GLOBAL_OPTIONS, build_parser, command_of
from taskctl.plain_args import read

PLAIN = [
    ["list"],
    ["--json", "list"],
    ["list", "--json", "--socket", "/tmp/x.sock"],
    ["--socket", "/a.sock", "jobs", "--socket=/b.sock"],  # the option after the command wins
    ["run", "hello"],
    ["run", "hello", "--payload", "-"],
    ["run", "--payload", '{"name": "Ada"}', "hello", "--detach", "--key", "k"],
    ["run", "hello", "--max-attempts=3", "--request-timeout", "5m", "--connect-timeout", "2s"],
    ["enqueue", "hello", "--delay", "1.5s", "--priority=-3", "--after", "4", "--after", "5"],
    ["enqueue", "hello", "--at", "2999-01-04T08:00:00+01:00", "--after-failure", "run"],
    ["enqueue", "hello", "--each", "@jobs.jsonl", "--on-finish", "report"],
    ["jobs", "--status", "failed,pending", "--status", "running", "--limit", "5"],
    ["jobs", "--origin", "schedule", "--payloads", "--task", "hello"],
    ["jobs", "--key", "k", "--since", "2h", "--until=30m", "--text", "ada", "--before", "7"],
    ["jobs", "--since", "2026-12-01T08:00:00+01:00", "--until", "@1764572400"],
    ["jobs", "--since", "2026-12-01T08:00"],  # local time
    ["job", "42"],
    ["logs", "-f", "42"],
    ["wait", "42", "--timeout", "1m"],
    ["prune", "--older-than", "1d"],
    ["completion", "fish"],
    ["status"],
    ["top"],
]
LEFT_TO_ARGPARSE = [
    [],
    ["--json"],
    ["--help"],
    ["list", "-h"],
    ["--version"],
    ["lsit"],  # a typo, which argparse explains
    ["list", "--jso"],  # abbreviated
    ["run"],  # the task is missing
    ["run", "a", "b"],
    ["run", "hello", "--payload"],
    ["enqueue", "hello", "--priority", "-3"],  # a negative number: argparse decides
    ["enqueue", "hello", "--priority", "3x"],
    ["enqueue", "hello", "--delay", "soon"],  # a type refuses it
    ["jobs", "--origin", "cron"],  # not a choice
    ["jobs", "--limit", "0"],
    ["jobs", "--since", "yesterday"],  # neither a time nor a duration
    ["jobs", "--until", "@soon"],
    ["jobs", "--before", "0"],
    ["run", "--", "hello"],
    ["run", "hello", "--detach=yes"],
    ["job", "-1"],  # looks like an option
    ["schedules"],  # a command with actions
    ["schedules", "pause", "nightly"],
]


@pytest.mark.parametrize("words", PLAIN, ids=" ".join)
def test_a_plain_command_line_reads_as_argparse_reads_it(words: list[str]) -> None:
    quick = read(words, COMMANDS, GLOBAL_OPTIONS)
    assert quick is not None, "left to argparse"
    assert vars(quick) == vars(build_parser(command_of(words)).parse_args(words))


@pytest.mark.parametrize("words", LEFT_TO_ARGPARSE, ids=" ".join)
def test_any_other_command_line_is_left_to_argparse(words: list[str]) -> None:
    assert read(words, COMMANDS, GLOBAL_OPTIONS) is None


def test_a_duration_since_or_until_counts_back_from_the_call() -> None:
    args = read(["jobs", "--since", "2h", "--until", "@1764572400"], COMMANDS, GLOBAL_OPTIONS)
    assert args is not None
    assert args.since.at(10_000.0) == 10_000.0 - 7200 and args.until.at(10_000.0) == 1764572400
