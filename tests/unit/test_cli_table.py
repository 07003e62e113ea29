"""taskctl's command table: the parser, the epilogs, the exit statuses and the global
options all come from it (and the protocol's declarations), nothing is written twice."""

from __future__ import annotations

import re

import pytest

from taskctl.cli import (
    COMMANDS,
    GLOBAL_OPTIONS,
    VALUED_OPTIONS,
    Exit,
    build_parser,
    exit_help,
)
from taskd.protocol import METHODS


def test_the_exit_statuses_help_lists_every_status() -> None:
    listed = [int(number) for number in re.findall(r"^\s+(\d+)  ", exit_help(), flags=re.M)]
    assert listed == [int(status) for status in Exit]
    assert all(status.help.split("\n")[0] in exit_help() for status in Exit)


def test_a_command_for_a_method_says_what_the_method_declares() -> None:
    # `pause NAME` pauses a task, `schedules pause ID` a schedule.
    commands = [(command, "task") for command in COMMANDS] + [
        (action, "schedule") for command in COMMANDS for action in command.actions
    ]
    for command, of in commands:
        method = METHODS.get(command.name) or METHODS.get(f"{command.name}_{of}")
        if method is not None:
            assert (command.help, command.examples) == (method.help, method.examples)
        assert command.help and command.examples, f"{command.name} needs a help and examples"


def test_a_command_line_builds_only_its_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser("schedules")
    with pytest.raises(SystemExit):
        parser.parse_args(["schedules", "pause", "--help"])
    assert "taskctl schedules pause nightly-index" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["jobs"])  # not built: an invalid choice


def test_the_valued_global_options_are_those_that_take_a_value() -> None:
    assert {"--socket", "--connect-timeout", "--request-timeout"} == VALUED_OPTIONS
    assert {flag for option in GLOBAL_OPTIONS for flag in option.flags} == VALUED_OPTIONS | {
        "--json"
    }
