"""contrib/protocol.md lists every key of every object taskd sends, as the schema (and so the
wire types) give them, and marks none of them optional: a client written from the document
alone expects exactly the keys taskd sends."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.test_protocol_schema import SCHEMA, sent_definitions

DOCUMENT = (Path(__file__).parents[2] / "contrib" / "protocol.md").read_text()

# Where the document lists each object's keys: the text just before a `{"key", ...}` list,
# or the line above a table whose first column names the keys.
LISTINGS = {
    "AttemptError": "filled by `job` only (empty elsewhere): `",
    "ConnectionStats": "`connections`: `",
    "EnqueueManyResult": "of `invalid_params`, `$.jobs[i]...`). Result: `",
    "EnqueueResult": "The reply is\nsent after the job has been committed\nto disk. Result: `",
    "ErrorBody": "| `error`  | map  | `",
    "FiredJob": "the jobs of the last firing: `",
    "HelloResult": "- result: `",
    "Job": "## The Job object\n",
    "JobEvent": "An event is a map with every key present:\n",
    "JobLogs": 'params: `{"id": int}`. Result: `',
    "LogLine": "oldest first, each\n`",
    "NodeInfo": '"nodes": [',
    "Progress": "the latest `ctx.progress` of its latest attempt: `",
    "PruneResult": "past the configured retention. Result: `",
    "ReloadResult": "like SIGHUP. Result:\n`",
    "ScheduleInfo": "## The Schedule object\n",
    "Status": "### `status` (read)\nparams: `{}`. Result: `",
    "StoreFailing": "go through; else `",
    "SubscribeResult": "then the reply: `",
    "TaskCounts": '"tasks": [',
    "TaskInfo": "a list of task objects, sorted by name:\n`",
    "ThreadStats": "`threads`: `",
    "WorkerSlots": "`slots`: `",
    "HttpStats": "`http`: nil without an `[http]` listener; else `",
    "TimelineEvent": '"timeline": [',
    "WhyResult": "as the daemon\nsees it in the job store. Result: `",
    "RunResult": "with it, at once.\nResult: `",
    "TaskPauseResult": "survives restarts. Result:\n`",
    "BatchInfo": "(a batch's id). Result: `",
    "LimitUse": "store, a LimitUse: `",
    "KeyedUse": "a `limit_key`, a KeyedUse: `",
}
# The reply envelope is documented by its own table and rules ("Requests and replies").
ENVELOPE = {"Reply"}


def listed_keys(anchor: str) -> dict[str, bool]:
    """The keys listed after `anchor`, each with whether it is marked optional (`?`)."""
    assert DOCUMENT.count(anchor) == 1, f"{anchor!r} is not once in protocol.md"
    text = DOCUMENT[DOCUMENT.index(anchor) + len(anchor) :].lstrip("\n")
    return _table_keys(text) if text.startswith("|") else _brace_keys(text)


def _table_keys(text: str) -> dict[str, bool]:
    keys: dict[str, bool] = {}
    for line in text.splitlines():
        if not line.startswith("|"):
            break
        first = line.split("|")[1]
        keys |= {key: False for key in re.findall(r"`([a-z_]+)`", first)}
    return keys


def _brace_keys(text: str) -> dict[str, bool]:
    """The top-level keys of the `{...}` (or `[{...}]`) at the start of `text`."""
    assert text[0] in "{[", f"no key list at {text[:40]!r}"
    keys: dict[str, bool] = {}
    depth, previous = 0, ""
    for match in re.finditer(r'"([a-z_]+)"(\??)|[{}\[\]]|[^\s"{}\[\]]', text):
        token = match.group(0)
        if token in "{[":
            depth += 1
        elif token in "}]":
            depth -= 1
            if depth == 0:
                return keys
        elif match.group(1) and depth == 1 + (text[0] == "[") and previous in ("{", ","):
            keys[match.group(1)] = bool(match.group(2))
        previous = token
    raise AssertionError(f"unclosed key list at {text[:40]!r}")


def test_every_object_taskd_sends_has_its_keys_listed() -> None:
    sent = set(sent_definitions()) - ENVELOPE
    assert sent == set(LISTINGS), "list the new object's keys in protocol.md"


@pytest.mark.parametrize("name", sorted(LISTINGS))
def test_the_document_lists_exactly_the_keys_taskd_sends(name: str) -> None:
    listed = listed_keys(LISTINGS[name])
    assert set(listed) == set(SCHEMA["$defs"][name]["properties"])
    assert not any(listed.values()), f"{name}: every key is always sent, none is optional"
