"""The `[http]` settings checked: the address to listen on, and the Bearer tokens.

Standard library only (no HTTP library): the daemon checks these at start-up, at each reload
and in `taskd --check`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import stat
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, NamedTuple

from taskd.config import ConfigError, HttpConfig

Access = Literal["full", "readonly"]
MIN_TOKEN_LENGTH = 16
# RFC 6750's token68: what may follow "Bearer " in an Authorization header.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_BEARER = re.compile(r"bearer +(\S+) *", re.IGNORECASE)


class Tokens:
    """The full-access and read-only tokens; `access` says which one a header carries."""

    def __init__(self, full: Iterable[str] = (), readonly: Iterable[str] = ()) -> None:
        self._tokens: list[tuple[bytes, Access]] = [(token.encode(), "full") for token in full]
        self._tokens += [(token.encode(), "readonly") for token in readonly]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def fingerprints(self) -> dict[str, Access]:
        """Each token's SHA-256 (hex) and access: what a dashboard session remembers of the
        token it was opened with, so that a reload without that token ends it."""
        return {fingerprint(token.decode()): access for token, access in self._tokens}

    def access(self, authorization: bytes | None) -> Access | None:
        """The access an `Authorization: Bearer TOKEN` header grants, or None.

        Every configured token is compared, each in constant time, so the time taken says
        nothing about which token, or how much of one, matched.
        """
        match = _BEARER.fullmatch(authorization.decode("latin-1")) if authorization else None
        given = match.group(1).encode("latin-1") if match else b""
        granted: Access | None = None
        for token, access in self._tokens:
            if hmac.compare_digest(token, given) and granted is None:
                granted = access
        return granted if match else None


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Listen(NamedTuple):
    """Where the HTTP API listens: a TCP host and port, or a Unix socket's path."""

    host: str | None = None
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"http://{f'[{self.host}]' if ':' in (self.host or '') else self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host or "").is_loopback
        except ValueError:
            return self.host == "localhost"


class HttpSettings(NamedTuple):
    config: HttpConfig
    listen: Listen
    tokens: Tokens


def load_settings(config: HttpConfig) -> HttpSettings:
    """`[http]` checked: ConfigError if the address or a token is unusable, or if a TCP
    address has no token (any local user can reach one, even on the loopback)."""
    listen = parse_listen(config.listen)
    tokens = load_tokens(config)
    for proxy in config.trusted_proxies:
        try:
            ipaddress.ip_address(proxy)
        except ValueError:
            raise ConfigError(
                f"[http] trusted_proxies: {proxy!r} is not an IP address (such as 127.0.0.1)"
            ) from None
    if listen.path is None and not tokens:
        raise ConfigError(
            f"[http] listen = {config.listen!r} is a TCP address, which every user of this "
            "machine can reach: set tokens (or readonly_tokens, or tokens_file), or listen on "
            'a Unix socket ("unix:/run/taskd/http.sock")'
        )
    return HttpSettings(config, listen, tokens)


def parse_listen(text: str) -> Listen:
    """`127.0.0.1:8080`, `[::1]:8080`, `localhost:8080` or `unix:/path/http.sock`."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path:
            raise ConfigError('[http] listen = "unix:" needs a path: "unix:/run/taskd/http.sock"')
        return Listen(path=Path(path))
    example = 'use "HOST:PORT" ("127.0.0.1:8080", "[::1]:8080") or "unix:PATH"'
    try:
        parts = urllib.parse.urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"[http] listen = {text!r}: {exc}; {example}") from None
    if not host or port is None or parts.path or parts.username:
        raise ConfigError(f"[http] listen = {text!r} is not an address; {example}")
    return Listen(host=host, port=port)


def load_tokens(config: HttpConfig) -> Tokens:
    """The tokens of `[http]`, from the table and `tokens_file`; ConfigError if one is unusable."""
    full = [(f"tokens[{index}]", token) for index, token in enumerate(config.tokens)]
    readonly = [(f"readonly_tokens[{i}]", token) for i, token in enumerate(config.readonly_tokens)]
    if config.tokens_file is not None:
        more_full, more_readonly = _read_tokens_file(config.tokens_file)
        full += more_full
        readonly += more_readonly
    for where, token in full + readonly:
        if len(token) < MIN_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            raise ConfigError(
                f"[http] {where} is not a usable token: a token needs at least "
                f"{MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / (make one with "
                "`openssl rand -hex 32`)"
            )
    if {token for _, token in full} & {token for _, token in readonly}:
        raise ConfigError("[http] a token is both a full-access and a read-only one; pick one")
    return Tokens([token for _, token in full], [token for _, token in readonly])


def _read_tokens_file(path: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`tokens_file`: one token per line, `readonly TOKEN` for a read-only one; # comments."""
    try:
        with open(path, encoding="utf-8") as file:
            mode = os.fstat(file.fileno()).st_mode
            lines = file.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"[http] cannot read tokens_file {path}: {exc.strerror}") from None
    except UnicodeError as exc:
        raise ConfigError(f"[http] tokens_file {path} is not UTF-8 text: {exc}") from None
    if mode & stat.S_IRWXO:
        raise ConfigError(
            f"[http] tokens_file {path} is open to every user of this machine; "
            f"make it private: chmod o-rwx {path}"
        )
    full: list[tuple[str, str]] = []
    readonly: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        where = f"tokens_file {path}, line {number},"
        if len(words) == 2 and words[0] == "readonly":
            readonly.append((where, words[1]))
        elif len(words) == 1:
            full.append((where, words[0]))
        elif words:
            raise ConfigError(
                f"[http] tokens_file {path}, line {number}: expected TOKEN or `readonly TOKEN`"
            )
    return full, readonly
