"""Test helpers for the HTTP API: the `[http]` table, and a real HTTP client (http.client)."""

from __future__ import annotations

import http.client
import json
import re
import socket
from pathlib import Path
from typing import Any, NamedTuple

from tests.support import Taskd

TOKEN = "full-access-token-0123456789"
READONLY_TOKEN = "read-only-token-0123456789"
DEFAULT = object()


def http_config(listen: str = "127.0.0.1:0", *, tokens: bool = True, **settings: object) -> str:
    """An `[http]` table: `listen`, the two test tokens, and any other settings (as TOML)."""
    lines = [f'listen = "{listen}"']
    if tokens:
        lines += [f'tokens = ["{TOKEN}"]', f'readonly_tokens = ["{READONLY_TOKEN}"]']
    lines += [f"{name} = {json.dumps(value)}" for name, value in settings.items()]
    return "[http]\n" + "\n".join(lines) + "\n"


def http_stats(daemon: Taskd) -> dict[str, Any]:
    """The `http` part of `taskctl status --json`: the listener's connections and refusals."""
    done = daemon.ctl("status", "--json")
    assert done.returncode == 0, done.stderr
    stats: dict[str, Any] = json.loads(done.stdout)["http"]
    return stats


def http_port(daemon: Taskd) -> int:
    """The port taskd chose for `listen = "127.0.0.1:0"`, from its log (logged before READY)."""
    match = re.search(r"HTTP API listening on http://127\.0\.0\.1:(\d+)", daemon.log)
    assert match, daemon.log
    return int(match.group(1))


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The `error` object of an error response (which has nothing else)."""
        document = self.json()
        assert set(document) == {"error"} and set(document["error"]) >= {"code", "message"}
        error: dict[str, Any] = document["error"]
        return error


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


class HttpClient:
    """One request per connection to a taskd's HTTP API, on TCP or a Unix socket."""

    def __init__(self, port: int = 0, *, unix: Path | None = None, token: str | None = TOKEN):
        self.port, self.unix, self.token = port, unix, token

    @classmethod
    def of(cls, daemon: Taskd, token: str | None = TOKEN) -> HttpClient:
        return cls(http_port(daemon), token=token)

    def connection(self, timeout: float = 60.0) -> http.client.HTTPConnection:
        if self.unix is not None:
            return _UnixConnection(self.unix, timeout)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict[str, Any] | None = None,
        *,
        token: object = DEFAULT,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> Response:
        token = self.token if token is DEFAULT else token
        sent = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        if isinstance(body, dict):
            body = json.dumps(body)
            sent.setdefault("Content-Type", "application/json")
        connection = self.connection(timeout)
        try:
            connection.request(method, path, body=body, headers=sent)
            reply = connection.getresponse()
            content = reply.read()
            return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, content)
        finally:
            connection.close()

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Response:
        return self.request("POST", path, body, **kwargs)
