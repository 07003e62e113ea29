"""Schedules from taskd.toml: both forms, ids, time zones, and every mistake named."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from taskd.config import ConfigError, load_config
from taskd.schedules import ScheduleSpec, load_schedules
from taskd.tasks import TaskRegistry, load_tasks
from tests.support import FIXTURE_TASKS


@pytest.fixture(scope="module")
def registry() -> TaskRegistry:
    return load_tasks(FIXTURE_TASKS)


def schedules(tmp_path: Path, registry: TaskRegistry, text: str) -> list[ScheduleSpec]:
    file = tmp_path / "taskd.toml"
    file.write_text(text)
    config, _ = load_config(file)
    return load_schedules(config, registry)


def test_both_forms_ids_and_time_zones(tmp_path: Path, registry: TaskRegistry) -> None:
    specs = schedules(
        tmp_path,
        registry,
        """
        timezone = "Europe/Berlin"
        [scheduled_tasks]
        "*/5  * * * *" = ["echo", "db"]
        "0 8 * * 1" = "echo"
        "*/2 * * * * *" = ["slow"]
        "@Hourly" = ["echo"]
        "@startup" = ["db"]

        [[schedule]]
        id = "nightly"
        cron = "30 2 * * *"
        tasks = "slow"
        timezone = "America/New_York"
        payload = { seconds = 0.1 }
        catch_up = "all"
        max_catch_up = 3

        [[schedule]]
        cron = "0 0 1 1 *"
        tasks = ["echo"]
        enabled = false
        """,
    )
    by_id = {spec.id: spec for spec in specs}
    assert list(by_id) == [
        "*/5 * * * *", "0 8 * * 1", "*/2 * * * * *", "@hourly", "@startup", "nightly", "0 0 1 1 *"
    ]  # fmt: skip
    assert by_id["*/5 * * * *"].tasks == ("echo", "db")
    assert by_id["0 8 * * 1"].tasks == ("echo",)
    assert by_id["@startup"].startup and by_id["@startup"].cron is None
    assert by_id["@hourly"].timezone == "Europe/Berlin"
    nightly = by_id["nightly"]
    assert (nightly.expression, nightly.timezone, nightly.catch_up, nightly.max_catch_up) == (
        "30 2 * * *", "America/New_York", "all", 3,
    )  # fmt: skip
    assert not by_id["0 0 1 1 *"].enabled
    payload = msgspec.msgpack.decode(nightly.tick_payload(1_790_000_000.0))
    assert payload == {
        "scheduled_time": "2026-09-21T10:13:20-04:00", "cron": "30 2 * * *", "seconds": 0.1,
    }  # fmt: skip


def test_no_schedules(tmp_path: Path, registry: TaskRegistry) -> None:
    assert schedules(tmp_path, registry, "") == []


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        (
            '[scheduled_tasks]\n"61 * * * *" = "echo"',
            ['[scheduled_tasks] "61 * * * *": the minute field "61" is not valid (allowed: 0-59)'],
        ),
        (
            '[scheduled_tasks]\n"* * * * *" = "ecoh"',
            ['names unknown task "ecoh"; did you mean "echo"?'],
        ),
        (
            '[scheduled_tasks]\n"* * * * *" = ["echo", "echo"]',
            ["lists task echo more than once"],
        ),
        ('[scheduled_tasks]\n"* * * * *" = []', ["names no tasks"]),
        (
            'timezone = "Mars/Olympus"\n[scheduled_tasks]\n"* * * * *" = "echo"',
            ['timezone: unknown time zone "Mars/Olympus"'],
        ),
        (
            '[[schedule]]\ncron = "@daily"\ntasks = "echo"\ntimezone = "Europe/Berln"',
            ['[[schedule]] number 1 (cron "@daily"): unknown time zone "Europe/Berln"'],
        ),
        (
            # email's payload is a Struct with a required `to`: a tick cannot satisfy it.
            '[scheduled_tasks]\n"@daily" = "email"',
            ["task email cannot accept this schedule's payload", "to"],
        ),
        (
            '[[schedule]]\ncron = "@daily"\ntasks = "echo"\npayload = { cron = "x" }',
            ['payload must not set "cron"'],
        ),
        (
            '[[schedule]]\ncron = "@startup"\ntasks = "echo"\ncatch_up = "all"',
            ["@startup fires once at each start; catch_up does not apply"],
        ),
        (
            '[scheduled_tasks]\n"@daily" = "echo"\n[[schedule]]\ncron = "@daily"\ntasks = "db"',
            ['schedule id "@daily" is already taken by [scheduled_tasks] "@daily"'],
        ),
        (
            '[[schedule]]\nid = "x"\ncron = "@daily"\ntasks = "echo"\n'
            '[[schedule]]\nid = "x"\ncron = "@hourly"\ntasks = "db"',
            ['[[schedule]] number 2 (id "x", cron "@hourly"): schedule id "x" is already taken'],
        ),
        (
            # Everything wrong is reported at once.
            '[scheduled_tasks]\n"61 * * * *" = "echo"\n"@daily" = "nope"\n"@hourly" = "echo"',
            ['"61 * * * *"', 'names unknown task "nope"'],
        ),
    ],
)
def test_mistakes_are_named(
    tmp_path: Path, registry: TaskRegistry, text: str, messages: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        schedules(tmp_path, registry, text)
    for message in messages:
        assert message in str(caught.value)


def test_config_level_mistakes(tmp_path: Path, registry: TaskRegistry) -> None:
    with pytest.raises(ConfigError, match="max_catch_up must be at least 1"):
        schedules(tmp_path, registry, '[[schedule]]\ncron="@daily"\ntasks="echo"\nmax_catch_up=0')
    with pytest.raises(ConfigError) as caught:
        schedules(tmp_path, registry, '[[schedule]]\ncron="@daily"\ntasks="echo"\ncatch_up="some"')
    said = '[[schedule]] number 1: catch_up must be one of "skip", "latest", "all", got "some"'
    assert said in str(caught.value)
