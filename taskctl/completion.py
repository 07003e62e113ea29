"""Shell completion: `taskctl completion bash|zsh|fish` prints a script that asks
`taskctl __complete SHELL WORD...` for the candidates, so that the three shells complete
alike.

The commands and options come from taskctl's command table (taskctl.cli.COMMANDS); task
names, job ids and schedule ids from the running taskd (asked briefly, and quietly skipped
if it does not answer). zsh and fish quote what they insert; bash inserts candidates as
they are, so for bash they come quoted (a schedule id such as `*/5 * * * *` as
`'*/5 * * * *'`).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable

from taskctl.cli import COMMANDS, GLOBAL_OPTIONS, Arg, Command
from taskctl.client import Client

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
# compdef comes with zsh's completion system: start it if ~/.zshrc has not (yet).
(( $+functions[compdef] )) || { autoload -Uz compinit && compinit -i }
compdef _taskctl taskctl
""",
    "fish": """\
# taskctl completion for fish: taskctl completion fish | source
complete -c taskctl -f -a '(taskctl __complete fish (commandline -opc)[2..-1] (commandline -ct))'
""",
}
# The options of every command, argparse's own among them, and the top level's --version.
_GLOBAL = (*GLOBAL_OPTIONS, Arg("-h", "--help", action="store_true"))
VERSION = Arg("--version", action="version")


def script(shell: str) -> str:
    return SCRIPTS[shell]


def complete(words: list[str]) -> list[str]:
    """The candidates for the last of `words` (the word being typed, maybe empty), after
    the shell's name (older scripts sent none), quoted for the shell that asks."""
    if words[:1] and words[0] in SCRIPTS:
        shell, words = words[0], words[1:]
    else:
        shell = None
    candidates = _completions(words)
    return [shlex.quote(c) for c in candidates] if shell == "bash" else candidates


def _completions(words: list[str]) -> list[str]:
    *before, current = words or [""]
    current = current.lstrip("'\"")  # a quote the user opened: the candidates are unquoted
    socket = _option_value(before, "--socket")
    command, positionals = _command(before)
    previous = before[-1] if before else ""
    options = _options(command)
    if (option := options.get(previous)) is not None and option.takes_value:
        return _matching(current, _candidates(option, socket))
    if current.startswith("-"):
        return _matching(current, sorted(options))
    if command is None:
        return _matching(current, sorted(command.name for command in COMMANDS))
    argument = _next_positional(command, positionals)
    return _matching(current, _candidates(argument, socket) if argument is not None else [])


def _command(words: list[str]) -> tuple[Command | None, list[str]]:
    """The command among `words`, and the positional words after it."""
    by_name = {command.name: command for command in COMMANDS}
    command: Command | None = None
    positionals: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word.startswith("-"):
            option = _options(None).get(word) or _options(command).get(word)
            skip = option is not None and option.takes_value
        elif command is None and word in by_name:
            command = by_name[word]
        elif command is not None:
            positionals.append(word)
    return command, positionals


def _options(command: Command | None) -> dict[str, Arg]:
    """The options of the command (the top level's without one), by flag."""
    options = [*_GLOBAL, *(command.args if command is not None else [VERSION])]
    return {flag: option for option in options if not option.positional for flag in option.flags}


def _next_positional(command: Command, positionals: list[str]) -> Arg | Command | None:
    """What the next positional word of `command` is: one of its actions, or an argument."""
    if command.actions:
        if not positionals:
            return command
        action = next((a for a in command.actions if a.name == positionals[0]), None)
        return _next_positional(action, positionals[1:]) if action is not None else None
    arguments = [argument for argument in command.args if argument.positional]
    for index, argument in enumerate(arguments):
        if index == len(positionals) or argument.options.get("nargs") in ("+", "*"):
            return argument
    return None


def _candidates(what: Arg | Command, socket: str | None) -> list[str]:
    if isinstance(what, Command):
        return [action.name for action in what.actions]
    if "choices" in what.options:
        return sorted(what.options["choices"])
    if what.complete == "tasks":
        return _ask(socket, lambda client: [task.name for task in client.list_tasks()])
    if what.complete == "jobs":
        return _ask(socket, lambda client: [str(job.id) for job in client.jobs(limit=50)])
    if what.complete == "schedules":
        return _ask(socket, lambda client: [schedule.id for schedule in client.schedules()])
    return list(what.complete or ())


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
