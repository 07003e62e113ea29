"""Shell completion: `taskctl completion bash|zsh|fish` prints a script that asks
`taskctl __complete SHELL WORD...` for the candidates, so that the three shells complete
alike.

The commands and options come from taskctl's own parser; task names, job ids and schedule
ids from the running taskd (asked briefly, and quietly skipped if it does not answer).
zsh and fish quote what they insert; bash inserts candidates as they are, so for bash they
come quoted (a schedule id such as `*/5 * * * *` as `'*/5 * * * *'`).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Iterable

from taskctl.client import Client
from taskd.models import JOB_STATUSES

SCRIPTS = {
    "bash": """\
# taskctl completion for bash: source <(taskctl completion bash)
_taskctl() {
    mapfile -t COMPREPLY < <(taskctl __complete bash "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null)
}
complete -o default -F _taskctl taskctl
""",
    "zsh": """\
#compdef taskctl
# taskctl completion for zsh: source <(taskctl completion zsh)
_taskctl() {
    local -a candidates
    candidates=("${(@f)$(taskctl __complete zsh "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    if (( ${#candidates} )) && [[ -n "${candidates[1]}" ]]; then
        compadd -a candidates
    else
        _files
    fi
}
compdef _taskctl taskctl
""",
    "fish": """\
# taskctl completion for fish: taskctl completion fish | source
complete -c taskctl -f -a '(taskctl __complete fish (commandline -opc)[2..-1] (commandline -ct))'
""",
}
JOB_COMMANDS = {"job", "wait", "cancel", "retry", "why"}
TASK_COMMANDS = {"run", "enqueue"}
SCHEDULE_ACTIONS = ("pause", "resume", "trigger")


def script(shell: str) -> str:
    return SCRIPTS[shell]


def complete(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """The candidates for the last of `words` (the word being typed, maybe empty), after
    the shell's name (older scripts sent none), quoted for the shell that asks."""
    if words[:1] and words[0] in SCRIPTS:
        shell, words = words[0], words[1:]
    else:
        shell = None
    candidates = _candidates(parser, words)
    return [shlex.quote(c) for c in candidates] if shell == "bash" else candidates


def _candidates(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    *before, current = words or [""]
    current = current.lstrip("'\"")  # a quote the user opened: the candidates are unquoted
    socket = _option_value(before, "--socket")
    command, positionals = _command(parser, before)
    previous = before[-1] if before else ""
    options = _options(parser, command)
    if previous in options.get("values", set()):
        return _matching(current, _values(previous, socket))
    if current.startswith("-"):
        return _matching(current, sorted(options["flags"] | options["values"]))
    if command is None:
        return _matching(current, sorted(_subcommands(parser)))
    if command in TASK_COMMANDS and not positionals:
        return _matching(current, _ask(socket, lambda c: [t.name for t in c.list_tasks()]))
    if command in JOB_COMMANDS and not positionals:
        return _matching(current, _ask(socket, lambda c: [str(j.id) for j in c.jobs(limit=50)]))
    if command == "schedules":
        if not positionals:
            return _matching(current, list(SCHEDULE_ACTIONS))
        return _matching(current, _ask(socket, lambda c: [s.id for s in c.schedules()]))
    if command == "completion" and not positionals:
        return _matching(current, sorted(SCRIPTS))
    return []


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command(parser: argparse.ArgumentParser, words: list[str]) -> tuple[str | None, list[str]]:
    """The command among `words`, and the positional words after it."""
    commands = _subcommands(parser)
    takes_value = _options(parser, None)["values"]
    command: str | None = None
    positionals: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in takes_value or word in _options(parser, command)["values"]
        elif command is None and word in commands:
            command = word
        elif command is not None:
            positionals.append(word)
    return command, positionals


def _options(parser: argparse.ArgumentParser, command: str | None) -> dict[str, set[str]]:
    """The options of the command (the top level's without one): flags and those taking a
    value."""
    target = _subcommands(parser).get(command or "", parser)
    flags: set[str] = set()
    values: set[str] = set()
    for action in target._actions:  # a command's parser has the global options too
        if action.option_strings and action.help != argparse.SUPPRESS:
            (values if action.nargs != 0 else flags).update(action.option_strings)
    return {"flags": flags, "values": values}


def _values(option: str, socket: str | None) -> list[str]:
    if option == "--status":
        return list(JOB_STATUSES)
    if option == "--task":
        return _ask(socket, lambda client: [task.name for task in client.list_tasks()])
    return []


def _option_value(words: list[str], option: str) -> str | None:
    for index, word in enumerate(words[:-1]):
        if word == option:
            return words[index + 1]
    return None


def _ask(socket: str | None, question: Callable[[Client], Iterable[str]]) -> list[str]:
    """What taskd answers, or nothing if it does not answer quickly."""
    try:
        with Client(socket, timeout=1.0) as client:
            return list(question(client))
    except Exception:  # completion must never print a traceback into the command line
        return []


def _matching(prefix: str, candidates: Iterable[str]) -> list[str]:
    return [candidate for candidate in candidates if candidate.startswith(prefix)]
