"""Discovery, naming, loading and payload validation of task files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import msgspec
import pytest

from taskd import define_task
from taskd.config import SharedLimitOptions, TaskOptions
from taskd.models import limit_key_of
from taskd.tasks import TaskLoadError, discover, load_tasks, task_name
from tests.support import FIXTURE_TASKS


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("hello.py", "hello"),
        ("scheduled/cleanup.py", "scheduled:cleanup"),
        ("jobs/send-email.py", "jobs:send-email"),
        ("db/index.py", "db"),
        ("a/b/c/index.py", "a:b:c"),
        ("index-builder.py", "index-builder"),
    ],
)
def test_task_name_from_path(path: str, name: str) -> None:
    assert task_name(Path(path)) == name


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


TASK = """
from taskd import define_task

@define_task
async def run(payload):
    return payload
"""


def test_discover_skips_helpers_and_hidden(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "a.py": TASK,
            "_lib.py": "",
            ".hidden.py": "",
            "_private/b.py": TASK,
            ".git/c.py": TASK,
            "sub/d.py": TASK,
            "notes.txt": "",
        },
    )
    found = [p.relative_to(tmp_path).as_posix() for p in discover(tmp_path)]
    assert found == ["a.py", "sub/d.py"]


def test_fixture_folder_loads_with_expected_names() -> None:
    registry = load_tasks(FIXTURE_TASKS)
    assert "nested:deep:send-it" in registry
    assert "db" in registry
    assert "_helper" not in registry
    assert registry.get("nested:deep:send-it").description.startswith("Nested path")  # type: ignore[union-attr]


def test_name_option_overrides_path(tmp_path: Path) -> None:
    write(tmp_path, {"x.py": TASK.replace("@define_task", "@define_task(name='custom:name')")})
    assert load_tasks(tmp_path).names() == ["custom:name"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.py": "x = 1\n"}, "defines no task"),
        ({"a.py": TASK + TASK.replace("def run", "def other")}, "found 2"),
        ({"a.py": "import no_such_module_here\n"}, "ModuleNotFoundError"),
        ({"a.py": "def broken(:\n"}, "SyntaxError"),
        ({"a.py": "raise RuntimeError('at import')\n"}, "RuntimeError: at import (line 1)"),
        (
            {"a.py": TASK, "b/index.py": TASK.replace("@define_task", "@define_task(name='a')")},
            "already taken",
        ),
        ({"a.py": TASK.replace("(payload)", "(a, b, c)")}, "must take"),
        ({"a.py": TASK.replace("@define_task", "@define_task(timeout=-1)")}, "timeout"),
        ({"a.py": TASK.replace("(payload)", "(payload: 'Missing')")}, "cannot read the signature"),
    ],
)
def test_broken_task_files_are_reported_with_file_and_cause(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    write(tmp_path, files)
    with pytest.raises(TaskLoadError) as caught:
        load_tasks(tmp_path)
    message = str(caught.value)
    assert expected in message
    assert str(tmp_path) in message


def test_a_helper_file_is_told_where_helpers_go(tmp_path: Path) -> None:
    write(tmp_path, {"util.py": "def shout(text):\n    return text.upper()\n", "a.py": TASK})
    with pytest.raises(TaskLoadError) as caught:
        load_tasks(tmp_path)
    assert "util.py: defines no task" in str(caught.value)
    assert "helpers go in files starting with `_`, e.g. `_util.py`" in str(caught.value)


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    write(tmp_path, {"a.py": "x = 1\n", "b.py": "def broken(:\n", "c.py": TASK})
    with pytest.raises(TaskLoadError) as caught:
        load_tasks(tmp_path)
    assert "a.py" in str(caught.value) and "b.py" in str(caught.value)


def test_missing_folder_and_unknown_override(tmp_path: Path) -> None:
    with pytest.raises(TaskLoadError, match="does not exist"):
        load_tasks(tmp_path / "nope")
    write(tmp_path, {"a.py": TASK})
    with pytest.raises(TaskLoadError, match=r'\[task."zzz"\] names no task'):
        load_tasks(tmp_path, {"zzz": TaskOptions()})


def test_config_options_override_definition(tmp_path: Path) -> None:
    write(
        tmp_path, {"a.py": TASK.replace("@define_task", "@define_task(concurrency=2, timeout=5)")}
    )
    task = load_tasks(tmp_path, {"a": TaskOptions(concurrency=7)}).get("a")
    assert task is not None
    assert (task.concurrency, task.timeout) == (7, 5.0)


PAYLOAD_KINDS = """
import dataclasses
from typing import TypedDict
import msgspec
from taskd import define_task, TaskContext

class S(msgspec.Struct):
    to: str
    count: int = 1

class T(TypedDict):
    to: str

@dataclasses.dataclass
class D:
    to: str

@define_task
async def task(payload: {kind}, ctx: TaskContext):
    return payload
"""


@pytest.mark.parametrize(
    ("kind", "good", "bad", "field"),
    [
        ("S", {"to": "x"}, {"to": 3}, "$.to"),
        ("T", {"to": "x"}, {"to": [1]}, "$.to"),
        ("D", {"to": "x"}, {}, "to"),
        ("dict", {"any": 1}, [1], "object"),
        ("dict[str, int]", {"a": 1}, {"a": "b"}, "$[...]"),
        ("None", None, {"a": 1}, "null"),
    ],
)
def test_payload_validation_names_the_field(
    tmp_path: Path, kind: str, good: object, bad: object, field: str
) -> None:
    write(tmp_path, {"t.py": PAYLOAD_KINDS.replace("{kind}", kind)})
    task = load_tasks(tmp_path).get("t")
    assert task is not None
    task.decode_payload(msgspec.msgpack.encode(good))
    with pytest.raises(msgspec.ValidationError) as caught:
        task.decode_payload(msgspec.msgpack.encode(bad))
    assert field in str(caught.value)


def test_unannotated_payload_accepts_anything_and_shapes_are_detected(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "any.py": TASK,
            "none.py": "from taskd import define_task\n@define_task\ndef f():\n    return 1\n",
            "ctx.py": "from taskd import define_task, TaskContext\n"
            "@define_task\nasync def f(ctx: TaskContext):\n    return ctx.name\n",
        },
    )
    registry = load_tasks(tmp_path)
    any_task, none_task, ctx_task = registry.get("any"), registry.get("none"), registry.get("ctx")
    assert any_task and none_task and ctx_task
    assert any_task.decode_payload(msgspec.msgpack.encode([1, "x"])) == [1, "x"]
    assert (none_task.takes_payload, none_task.takes_context, none_task.is_async) == (
        False,
        False,
        False,
    )
    assert (ctx_task.takes_payload, ctx_task.takes_context, ctx_task.is_async) == (
        False,
        True,
        True,
    )


def test_reload_reads_changed_files(tmp_path: Path) -> None:
    write(tmp_path, {"a.py": TASK.replace("@define_task", "@define_task(description='one')")})
    assert load_tasks(tmp_path).get("a").description == "one"  # type: ignore[union-attr]
    write(tmp_path, {"a.py": TASK.replace("@define_task", "@define_task(description='two')")})
    assert load_tasks(tmp_path).get("a").description == "two"  # type: ignore[union-attr]


TICK_TYPES = """
import datetime
from typing import TypedDict

import msgspec
from taskd import define_task


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    keep: int


class Timed(msgspec.Struct, forbid_unknown_fields=True):
    keep: int
    scheduled_time: datetime.datetime


class Keep(TypedDict):
    keep: int


@define_task
def task(payload: {annotation}) -> None: ...
"""
TICK = {"scheduled_time": "2026-03-29T03:00:00+02:00", "cron": "0 3 * * *", "keep": 7}


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        ("dict", TICK),  # as in Nitro: a map gets both
        ("Strict", {"keep": 7}),  # a strict Struct need not declare them
        ("Strict | None", {"keep": 7}),
        ("Timed", {"keep": 7, "scheduled_time": "2026-03-29T03:00:00+02:00"}),
        ("Keep", {"keep": 7}),
    ],
)
def test_a_ticks_fields_reach_the_payload_types_that_take_them(
    tmp_path: Path, annotation: str, expected: dict[str, object]
) -> None:
    write(tmp_path, {"t.py": TICK_TYPES.replace("{annotation}", annotation)})
    task = load_tasks(tmp_path).get("t")
    assert task is not None
    decoded = task.decode_payload(msgspec.msgpack.encode(TICK), tick=True)
    assert msgspec.to_builtins(decoded) == expected
    if annotation.startswith("Strict"):  # not a tick: the fields are the caller's, refused
        with pytest.raises(msgspec.ValidationError):
            task.decode_payload(msgspec.msgpack.encode(TICK))


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        ("dict", {"keep": "7", "other": "x"}),  # strings, as Nitro gives them
        ("dict[str, int]", {"keep": 7, "other": "x"}),  # "x" is left to the validation
        ("Strict", {"keep": 7, "other": "x"}),
        ("Strict | None", {"keep": 7, "other": "x"}),
        ("Keep", {"keep": 7, "other": "x"}),
    ],
)
def test_query_values_take_the_types_of_the_payloads_fields(
    tmp_path: Path, annotation: str, expected: dict[str, object]
) -> None:
    write(tmp_path, {"t.py": TICK_TYPES.replace("{annotation}", annotation)})
    task = load_tasks(tmp_path).get("t")
    assert task is not None
    assert task.query_payload({"keep": "7", "other": "x"}) == expected


def test_shared_limits_from_define_task_or_the_configuration(tmp_path: Path) -> None:
    write(tmp_path, {"a.py": TASK.replace("@define_task", '@define_task(limits=["api"])'),
                     "b.py": TASK, "c.py": TASK})  # fmt: skip
    limits = {"api": SharedLimitOptions(rate="25/s"), "db": SharedLimitOptions(concurrency=2)}
    registry = load_tasks(tmp_path, {"b": TaskOptions(limits=["api", "db"])}, limits)
    assert {name: limit.tasks for name, limit in registry.limits.items()} == {
        "api": ("a", "b"),
        "db": ("b",),
    }
    assert registry.limits["api"].interval == pytest.approx(0.04)
    info = registry.get("b")
    assert info is not None and info.info().limits == ["api", "db"]
    with pytest.raises(TaskLoadError, match="task a: limits names 'api', which no"):
        load_tasks(tmp_path, {}, {"apo": SharedLimitOptions(rate="1/s")})
    with pytest.raises(TaskLoadError, match='did you mean "apo"'):
        load_tasks(tmp_path, {}, {"apo": SharedLimitOptions(rate="1/s")})
    with pytest.raises(ValueError, match="limits must be a list"):
        define_task(lambda: None, limits="api")  # type: ignore[arg-type]


def test_a_limit_key_from_define_task_or_the_configuration(tmp_path: Path) -> None:
    keyed = TASK.replace("@define_task", '@define_task(limit_key="customer.id", concurrency=2)')
    write(tmp_path, {"a.py": keyed, "b.py": TASK})
    registry = load_tasks(tmp_path, {"b": TaskOptions(limit_key="tenant")})
    assert registry.limit_keys() == {"a": "customer.id", "b": "tenant"}
    info = registry.get("a")
    assert info is not None and info.info().limit_key == "customer.id"
    with pytest.raises(ValueError, match=r"invalid limit_key 'customer\.': name a payload field"):
        TaskOptions(limit_key="customer.")


@pytest.mark.parametrize(
    ("payload", "path", "key"),
    [
        ({"customer_id": "acme"}, "customer_id", "acme"),
        ({"customer_id": 42}, "customer_id", "42"),
        ({"customer": {"id": "x"}}, "customer.id", "x"),
        ({"customer": {"id": {"b": 1, "a": 2}}}, "customer.id", '{"a":2,"b":1}'),
        ({"other": 1}, "customer_id", ""),
        ({"customer": "flat"}, "customer.id", ""),
        ([1, 2], "customer_id", ""),
    ],
)
def test_the_key_of_a_payload(payload: object, path: str, key: str) -> None:
    assert limit_key_of(msgspec.msgpack.encode(payload), path) == key
