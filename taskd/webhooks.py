"""Signed webhooks ([[webhook]] in taskd.toml): the built-in task that delivers each event.

The store enqueues an event as a job of WEBHOOK_TASK in the transaction that makes it (see
taskd/store/core/webhooks.py); this task POSTs its JSON body, signed with the webhook's
secret, so that a delivery retries with backoff, shows in `taskctl jobs` and survives a
restart like any job. The request is HTTP/1.1 written and parsed by h11 over the loop's own
streams (TLS by asyncio's ssl with the default context), as the HTTP API does: no HTTP
client library to add, and every bound (time, response size) is ours.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

import taskd
from taskd.config import Config, ConfigError, TaskOptions
from taskd.definition import Fail, TaskContext, TaskDefinition
from taskd.models import WEBHOOK_TASK, WebhookRule
from taskd.tasks import Task, TaskLoadError, TaskRegistry, load_tasks

REQUEST_TIMEOUT = 10.0  # seconds for the whole exchange: connect, send, the response's head
MAX_RESPONSE = 64 * 1024  # bytes of a response read at most (its body is only quoted)
MAX_QUOTED = 200  # characters of a response body quoted in the error of a failed delivery


class Delivery(msgspec.Struct, frozen=True):
    """The payload of a WEBHOOK_TASK job: where, which event, and the JSON body to sign."""

    url: str
    event: str
    body: str


def load_tasks_and_webhooks(
    directory: Path, config: Config
) -> tuple[TaskRegistry, tuple[WebhookRule, ...]]:
    """The tasks folder's tasks, plus WEBHOOK_TASK if any [[webhook]] is configured (its
    secrets read now); the rules the store enqueues events by. Raises ConfigError or
    TaskLoadError."""
    options = {name: opts for name, opts in config.task.items() if name != WEBHOOK_TASK}
    registry = load_tasks(directory, options, config.limits)
    if not config.webhook:
        return registry, ()
    if WEBHOOK_TASK in registry:
        raise TaskLoadError(f"task name {WEBHOOK_TASK!r} is taskd's own (it delivers webhooks)")
    secrets: dict[str, bytes] = {}
    for number, hook in enumerate(config.webhook, 1):
        if hook.url in secrets:
            raise ConfigError(
                f"[[webhook]] number {number}: url {hook.url!r} is already in an earlier "
                "[[webhook]]; list all of its events in one table"
            )
        secrets[hook.url] = _read_secret(hook.secret_file, number)
    task = Task(WEBHOOK_TASK, Path("(built in)"), _definition(secrets),
                config.task.get(WEBHOOK_TASK, TaskOptions()))  # fmt: skip
    rules = tuple(
        WebhookRule(hook.url, frozenset(hook.events), tuple(hook.tasks), task.max_attempts)
        for hook in config.webhook
    )
    return registry.with_task(task), rules


def _read_secret(path: str, number: int) -> bytes:
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            f"[[webhook]] number {number}: cannot read secret_file {path}: {exc.strerror}; "
            "put the secret the receiver checks signatures with in it (one line, readable by "
            "taskd)"
        ) from None
    if not secret:
        raise ConfigError(
            f"[[webhook]] number {number}: secret_file {path} is empty; put the secret the "
            "receiver checks signatures with in it"
        )
    return secret


def _definition(secrets: dict[str, bytes]) -> TaskDefinition:
    async def deliver(delivery: Delivery, ctx: TaskContext) -> dict[str, Any]:
        secret = secrets.get(delivery.url)
        if secret is None:
            raise Fail(f"no [[webhook]] in taskd.toml has the url {delivery.url} any more")
        body = delivery.body.encode()
        headers = [
            ("Content-Type", "application/json"),
            ("User-Agent", f"taskd/{taskd.__version__}"),
            ("X-Taskd-Event", delivery.event),
            ("X-Taskd-Delivery", str(ctx.job_id)),
            ("X-Taskd-Signature", "sha256=" + sign(secret, body)),
        ]
        status, quoted = await post(delivery.url, headers, body)
        if not 200 <= status < 300:
            redirect = (
                " (taskd follows no redirect: configure the final URL)" if status < 400 else ""
            )
            raise RuntimeError(f"{delivery.url} answered {status}{redirect}: {quoted}")
        return {"status": status}

    return TaskDefinition(
        deliver,
        name=WEBHOOK_TASK,
        description="Delivers a webhook event ([[webhook]] in taskd.toml)",
        timeout=REQUEST_TIMEOUT + 5,
        max_attempts=8,
        backoff="30s",
        max_backoff="1h",
        concurrency=None,
    )


def sign(secret: bytes, body: bytes) -> str:
    """The hex HMAC-SHA256 of `body` with `secret` (X-Taskd-Signature: sha256=...)."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


async def post(
    url: str, headers: list[tuple[str, str]], body: bytes, *, timeout: float = REQUEST_TIMEOUT
) -> tuple[int, str]:
    """POST `body` to `url`; the status and the start of the response's body. Raises
    TimeoutError past `timeout`, OSError when the server cannot be reached."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl.create_default_context() if secure else None
        )
        try:
            return await _exchange(reader, writer, parts.netloc, target, headers, body)
        finally:
            writer.close()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> tuple[int, str]:
    import h11  # only once a webhook is delivered: a daemon without [http] loads no h11

    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE)
    head = [("Host", host), ("Content-Length", str(len(body))), ("Connection", "close")]
    request = h11.Request(method="POST", target=target, headers=head + headers)
    writer.write(connection.send(request) + connection.send(h11.Data(data=body)))
    writer.write(connection.send(h11.EndOfMessage()))
    await writer.drain()
    status, received = 0, bytearray()
    while len(received) < MAX_RESPONSE:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(MAX_RESPONSE))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            received += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if not status:
        raise ConnectionError("the server closed the connection without answering")
    quoted = received[:MAX_QUOTED].decode(errors="replace").strip() or "(no body)"
    return status, quoted
