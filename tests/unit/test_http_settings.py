"""`[http]`: the address to listen on and the Bearer tokens, checked before anything listens."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskd.config import ConfigError, HttpConfig, load_config
from taskd.http.settings import Listen, Tokens, load_settings, parse_listen

FULL, READONLY = "f" * 16, "r" * 32


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        ("127.0.0.1:8080", Listen(host="127.0.0.1", port=8080)),
        ("[::1]:8080", Listen(host="::1", port=8080)),
        ("localhost:0", Listen(host="localhost", port=0)),
        ("0.0.0.0:80", Listen(host="0.0.0.0", port=80)),
        ("unix:/run/taskd/http.sock", Listen(path=Path("/run/taskd/http.sock"))),
    ],
)
def test_addresses(text: str, listen: Listen) -> None:
    assert parse_listen(text) == listen


@pytest.mark.parametrize("text", ["8080", "127.0.0.1", "127.0.0.1:99999", "h:p", "unix:", "a:1/x"])
def test_bad_addresses_are_named(text: str) -> None:
    with pytest.raises(ConfigError, match="listen"):
        parse_listen(text)


def test_loopback() -> None:
    assert Listen(host="127.0.0.2").loopback and Listen(host="::1").loopback
    assert not Listen(host="0.0.0.0").loopback and not Listen(host="192.0.2.1").loopback
    assert str(Listen(host="::1", port=80)) == "http://[::1]:80"


def test_a_token_gives_its_access_and_nothing_else_does() -> None:
    tokens = Tokens([FULL], [READONLY])
    assert tokens.access(f"Bearer {FULL}".encode()) == "full"
    assert tokens.access(f"bearer  {READONLY}".encode()) == "readonly"
    refused = [FULL, f"Basic {FULL}", "Bearer " + FULL[:-1], f"Bearer {FULL}x", f"Bearer {FULL} x"]
    for header in [None, b"", b"Bearer \xff\xfe", *(text.encode() for text in refused)]:
        assert tokens.access(header) is None, header


def test_a_tcp_address_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="every user of this machine can reach"):
        load_settings(HttpConfig(listen="127.0.0.1:8080"))
    assert load_settings(HttpConfig(listen="127.0.0.1:8080", readonly_tokens=[READONLY])).tokens
    assert load_settings(HttpConfig(listen="unix:/run/taskd/http.sock")).listen.path


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (["short"], "tokens[0] is not a usable token"),
        ([FULL, "with space in it ok"], "tokens[1]"),
        ([FULL, READONLY, FULL + "é"], "tokens[2]"),
    ],
)
def test_weak_or_malformed_tokens_are_refused(tokens: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(HttpConfig(listen="127.0.0.1:1", tokens=tokens))


def test_a_token_cannot_be_both() -> None:
    with pytest.raises(ConfigError, match="both"):
        load_settings(HttpConfig(listen="127.0.0.1:1", tokens=[FULL], readonly_tokens=[FULL]))


def test_the_tokens_file(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text(f"# comment\n\n{FULL}   # the deploy script\nreadonly {READONLY}\n")
    file.chmod(0o600)
    tokens = load_settings(HttpConfig(listen="127.0.0.1:1", tokens_file=str(file))).tokens
    assert tokens.access(f"Bearer {FULL}".encode()) == "full"
    assert tokens.access(f"Bearer {READONLY}".encode()) == "readonly"
    file.write_text(f"write {FULL}\n")
    with pytest.raises(ConfigError, match="line 1: expected TOKEN or `readonly TOKEN`"):
        load_settings(HttpConfig(listen="127.0.0.1:1", tokens_file=str(file)))
    file.write_text(f"{FULL}\n")
    file.chmod(0o604)
    with pytest.raises(ConfigError, match="chmod o-rwx"):
        load_settings(HttpConfig(listen="127.0.0.1:1", tokens_file=str(file)))
    with pytest.raises(ConfigError, match="cannot read tokens_file"):
        load_settings(HttpConfig(listen="127.0.0.1:1", tokens_file=str(tmp_path / "absent")))


def test_relative_paths_are_taken_from_the_configuration_file(tmp_path: Path) -> None:
    file = tmp_path / "taskd.toml"
    file.write_text('[http]\nlisten = "unix:run/http.sock"\ntokens_file = "secrets/tokens"\n')
    config, _ = load_config(file)
    assert config.http is not None
    assert config.http.listen == f"unix:{tmp_path}/run/http.sock"
    assert config.http.tokens_file == str(tmp_path / "secrets" / "tokens")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[http]\nlisten = ""', "listen must not be empty"),
        ('[http]\nlisten = "127.0.0.1:1"\nmax_body_size = 10', "max_body_size"),
        ('[http]\nlisten = "127.0.0.1:1"\nread_timeout = "0s"', "read_timeout"),
        ('[http]\nlisten = "127.0.0.1:1"\ntoken = ["x"]', "token"),
        ("[http]\ntokens = []", "listen"),
    ],
)
def test_bad_http_settings_are_named(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "taskd.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(file)
