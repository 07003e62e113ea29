"""A command line read without argparse, when it is plain.

taskctl's everyday calls (`taskctl list`, `taskctl run NAME --payload ...`) are read here,
from the same command table argparse's parser is built from (taskctl.cli.COMMANDS):
importing argparse and building a parser would cost such a call a good part of its time.
Whatever argparse might read otherwise is left to it (`read` returns None): --help and
--version, abbreviated or unknown options, `--`, a value that looks like an option, a
value an argument's type or choices refuse, a missing or extra argument, a command with
actions (`schedules pause ...`). What `read` returns is what argparse's parser would.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from taskctl.cli import Arg, Command

# The argparse options read here; an argument with any other (nargs, say) is argparse's.
_PLAIN = frozenset({"metavar", "help", "type", "default", "action", "choices"})
_PLAIN_ACTIONS = (None, "store_true", "append")


def read(
    words: Sequence[str], commands: Sequence[Command], global_options: Sequence[Arg]
) -> SimpleNamespace | None:
    """The namespace argparse would make of `words`; None if argparse must read them."""
    command: Command | None = None
    flags = {flag: option for option in global_options for flag in option.flags}
    positionals: list[Arg] = []
    given: list[tuple[Arg, str | None]] = []  # in order; None: a flag without a value
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word.startswith("-") and word != "-":
            flag, equals, inline = word.partition("=")
            option = flags.get(flag)
            if option is None or not _plain(option):
                return None
            if option.options.get("action") == "store_true":
                if equals:
                    return None
                given.append((option, None))
            elif equals:
                given.append((option, inline))
            elif index < len(words) and not _option_like(words[index]):
                given.append((option, words[index]))
                index += 1
            else:
                return None
        elif command is None:
            command = next((c for c in commands if c.name == word), None)
            if command is None or command.actions or not all(map(_plain, command.args)):
                return None
            flags.update({f: a for a in command.args if not a.positional for f in a.flags})
            positionals = [arg for arg in command.args if arg.positional]
        elif positionals:
            given.append((positionals.pop(0), word))
        else:
            return None
    if command is None or positionals:
        return None
    return _namespace(command, global_options, given)


def _namespace(
    command: Command, global_options: Sequence[Arg], given: list[tuple[Arg, str | None]]
) -> SimpleNamespace | None:
    values: dict[str, Any] = {}
    for option in (*global_options, *command.args):
        values[dest(option)] = _default(option)
    for option, text in given:
        name = dest(option)
        action = option.options.get("action")
        if action == "store_true":
            values[name] = True
            continue
        try:
            value = _convert(option, text)
        except Exception:  # argparse says what is wrong with it
            return None
        choices = option.options.get("choices")
        if choices is not None and value not in choices:
            return None
        values[name] = [*(values[name] or ()), value] if action == "append" else value
    return SimpleNamespace(command=command.name, handler=command.handler, **values)


def dest(option: Arg) -> str:
    """The attribute argparse stores an argument under."""
    if option.positional:
        return option.flags[0]
    long = next((flag for flag in option.flags if flag.startswith("--")), option.flags[0])
    return long.lstrip("-").replace("-", "_")


def _plain(option: Arg) -> bool:
    return option.options.keys() <= _PLAIN and option.options.get("action") in _PLAIN_ACTIONS


def _option_like(word: str) -> bool:
    return word.startswith("-") and word != "-"


def _default(option: Arg) -> Any:
    action = option.options.get("action")
    default = option.options.get("default", False if action == "store_true" else None)
    if isinstance(default, str) and "type" in option.options:
        return option.options["type"](default)  # as argparse converts a string default
    return default


def _convert(option: Arg, text: str | None) -> Any:
    kind = option.options.get("type")
    return text if kind is None else kind(text)
