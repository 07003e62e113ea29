from __future__ import annotations

from pathlib import Path

import pytest

from taskd.config import (
    Config,
    ConfigError,
    HttpConfig,
    database_url,
    load_config,
    resolve_paths,
    restart_only,
)


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    file = tmp_path / "taskd.toml"
    file.write_text(text)
    return load_config(file)


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config, base = load(tmp_path, 'database = "data/t.db"\nsocket = "/run/x/t.sock"\n')
    assert config.workers == 16 and config.grace_period == 30 and config.lease == 60
    paths = resolve_paths(config, base)
    assert paths.database == f"sqlite://{tmp_path}/data/t.db"
    assert str(paths.socket) == "/run/x/t.sock"
    assert paths.tasks == tmp_path / "tasks"


@pytest.mark.parametrize(
    ("setting", "url"),
    [
        ("t.db", "sqlite:///base/t.db"),  # a file path, as always
        ("/var/lib/taskd/t.db", "sqlite:///var/lib/taskd/t.db"),
        ("sqlite:///var/lib/taskd/t.db", "sqlite:///var/lib/taskd/t.db"),
        ("sqlite://data/t.db", "sqlite:///base/data/t.db"),  # relative after sqlite://
        ("sqlite:///base/../t.db", "sqlite:///t.db"),
        ("postgresql://ada@db.example/jobs", "postgresql://ada@db.example/jobs"),  # as given
    ],
)
def test_the_database_is_a_path_or_a_url(setting: str, url: str) -> None:
    assert database_url(setting, Path("/base")) == url


def test_durations_accept_numbers_and_units(tmp_path: Path) -> None:
    config, _ = load(tmp_path, 'grace_period = "2m"\nlease = 90\n[retention]\nsucceeded = "1d"\n')
    assert (config.grace_period, config.lease, config.retention.succeeded) == (120, 90, 86400)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workers = 0", "workers must be at least 1"),
        ('workers = "many"', "workers"),
        ("wrokers = 3", "wrokers"),
        ('grace_period = "soon"', "invalid duration 'soon'"),
        ("grace_period = true", "grace_period"),
        ('log_level = "loud"', "log_level"),
        ("[task.x]\nconcurrency = 0", "concurrency must be at least 1"),
        ("workers = [", "invalid TOML"),
        ('database = "mysql://db/taskd"', "unsupported URL scheme 'mysql'"),
        ('[postgres]\nschema = "Taskd-1"', "schema 'Taskd-1': use 1 to 63 lowercase"),
        ("[postgres]\npool_size = 1", "pool_size must be at least 2"),
        ('node_id = "a/b"', "node_id 'a/b': use 1 to 100 letters"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert message in str(caught.value)
    assert str(tmp_path / "taskd.toml") in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "absent.toml")


def test_restart_only_settings_are_marked_on_the_fields() -> None:
    settings = restart_only(Config)
    assert {"workers", "database", "socket", "sqlite", "postgres"} <= set(settings)
    assert not {"log_level", "retention", "task", "schedule"} & set(settings)
    assert not {"tokens", "readonly_tokens", "tokens_file"} & set(restart_only(HttpConfig))
    assert {"listen", "max_body_size", "keepalive_timeout"} <= set(restart_only(HttpConfig))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("worker = 3", 'unknown key "worker" in {file}; did you mean "workers"?'),
        ('[task."reports:daily"]\ntimout = 3',
         'unknown key "timout" in [task."reports:daily"] of {file}; did you mean "timeout"?'),
        ('[retention]\nsucceded = "1d"',
         'unknown key "succeded" in [retention] of {file}; did you mean "succeeded"?'),
        ('[[schedule]]\ncron = "@daily"\ntasks = "a"\ncatch_up = "never"',
         '{file}: [[schedule]] number 1: catch_up must be one of "skip", "latest", "all", '
         'got "never"'),
        ('log_format = "xml"', '{file}: log_format must be one of "text", "json", got "xml"'),
        ('[task."reports:daily"]\nconcurrency = 0',
         '{file}: [task."reports:daily"]: concurrency must be at least 1, got 0'),
        ("[http]\nlisten = \"127.0.0.1:0\"\nmax_body_size = 10",
         "{file}: [http]: max_body_size must be at least 1024 bytes, got 10"),
    ],
)  # fmt: skip
def test_mistakes_are_said_so_that_they_can_be_fixed(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert str(caught.value) == message.format(file=tmp_path / "taskd.toml")
