"""taskctl's argparse parser, built from the command table (taskctl.cli.COMMANDS).

Loaded only for the command lines that taskctl.plain_args leaves to argparse: --help, a mistake
to explain, an abbreviated option, a command with actions.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from taskctl.cli import COMMANDS, GLOBAL_OPTIONS, Command, exit_help
from taskd import __version__
from taskd.protocol import client_socket_path


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, told the terminal's width as argparse would find it, but
    without importing shutil (and, through it, compression modules) on every call."""

    def __init__(self, prog: str) -> None:
        try:
            width = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                width = os.get_terminal_size(1).columns
            except (ValueError, OSError):
                width = 80
        super().__init__(prog, width=width - 2)


def _epilog(examples: tuple[str, ...]) -> str:
    lines = "".join(f"\n  {line}" for line in examples)
    return (
        f"example{'s' if len(examples) > 1 else ''}:{lines}\n\nexit statuses: see `taskctl --help`"
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """taskctl's parser; with `only`, with just that command (a command line names one, and
    building the other sixteen would cost it milliseconds)."""
    parser = argparse.ArgumentParser(
        prog="taskctl",
        description="Control taskd: list and run tasks, enqueue jobs, inspect them.",
        epilog=exit_help(),
        formatter_class=_Formatter,
    )
    socket = client_socket_path()
    _add_global_options(parser, socket, top=True)
    parser.add_argument("--version", action="version", version=f"taskctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        if only is None or command.name == only:
            _add_command(commands, command, socket)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, socket: str, *, top: bool) -> None:
    """The global options; below the top level they default to SUPPRESS, so that a
    subcommand without them keeps what was given before it."""
    for option in GLOBAL_OPTIONS:
        options = {**option.options, "help": option.options["help"].format(socket=socket)}
        if not top:
            options["default"] = argparse.SUPPRESS
        parser.add_argument(*option.flags, **options)


def _add_command(parent: Any, command: Command, socket: str) -> None:
    """`command`'s parser, under `parent` (argparse's subparsers action)."""
    sub = parent.add_parser(
        command.name,
        help=command.help,
        usage=command.usage,
        description=command.description,
        epilog=_epilog(command.examples),
        formatter_class=_Formatter,
    )
    _add_global_options(sub, socket, top=False)
    for option in command.args:
        sub.add_argument(*option.flags, **option.options)
    sub.set_defaults(handler=command.handler)
    if command.actions:
        actions = sub.add_subparsers(dest="action", metavar="[ACTION]")
        for action in command.actions:
            _add_command(actions, action, socket)
