"""The HTTP listener: HTTP/1.1 parsed and framed by h11, on the daemon's own asyncio streams.

Why h11 rather than aiohttp's low-level server: h11 is a small, pure-Python, sans-I/O
implementation of HTTP/1.1 (a parser and a state machine, no I/O and no dependencies of its
own), maintained by python-hyper and used under httpx and uvicorn; 0.16 closed its last
request-smuggling hole. It does the HTTP; the reading and writing happen here, on the same
(uvloop) streams and in the same style as the control socket in taskd/server.py, so every
bound a slow or hostile client can push against is enforced in this module, where the tests
reach it: the size of a request's head (h11's max_incomplete_event_size), the size of a body
before any of it is read (its Content-Length, else counted as chunks arrive), one deadline
for a whole request, the body bytes held at once over all connections, the number of
connections, and the time to write a response. aiohttp would bring its own request objects,
timeouts, keep-alive policy and access log, and half a dozen more packages, in place of the
one loop below. This module is imported only when taskd.toml has an `[http]` table.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
from contextlib import suppress

import h11

import taskd
from taskd.access import AccessPolicy, peer_groups, peer_of, user_name
from taskd.config import HttpConfig, restart_only
from taskd.http.api import HttpErrorCode
from taskd.http.routes import HttpApi, HttpRequest, HttpResponse, error_response
from taskd.http.settings import HttpSettings, Listen
from taskd.models import Peer
from taskd.protocol import ErrorCode
from taskd.server import ACCESS_HINT, bind_socket, release_socket

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # the request line and the headers
BODY_BUDGET = 64 * 1024 * 1024  # body bytes held at once, over all connections
READ_CHUNK = 64 * 1024
# A connection closed after an error response first reads and drops what its client still
# sends (LINGER seconds, LINGER_BYTES at most; at most MAX_LINGERING connections at once), so
# that closing with unread data does not reset the connection before the client has read
# the response.
LINGER = 2.0
LINGER_BYTES = 16 * 1024 * 1024
MAX_LINGERING = 64
SERVER = f"taskd/{taskd.__version__}"
HEAD_TOO_LARGE = f"the request line and headers are over {MAX_HEAD} bytes"


class _Refusal(Exception):
    """Answer the request with this error, then close the connection."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Connection:
    __slots__ = ("client", "handling", "method", "peer", "protocol", "reader", "reserved", "writer")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer | None,
        client: str,
    ) -> None:
        self.reader, self.writer, self.peer, self.client = reader, writer, peer, client
        self.protocol = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.handling: asyncio.Task[HttpResponse] | None = None
        self.method = b""
        self.reserved = 0  # body bytes this connection holds of the shared budget


class HttpServer:
    """Serves the HTTP API on a TCP address or a Unix socket."""

    def __init__(
        self,
        api: HttpApi,
        settings: HttpSettings,
        access: AccessPolicy,
        *,
        socket_group: int | None,
    ) -> None:
        self._api = api
        self._config = settings.config
        self._listen = settings.listen
        self._tokens = settings.tokens
        self._access = access
        self._socket_group = socket_group
        self._server: asyncio.Server | None = None
        self._socket_lock: int | None = None
        self._connections: set[_Connection] = set()
        self._serving: set[asyncio.Task[None]] = set()  # one per connection, refused ones too
        self._budget = max(BODY_BUDGET, self._config.max_body_size)
        self._buffered = 0
        self._lingering = 0
        self._closing = False

    async def start(self) -> None:
        """Listen; raises OSError, or SocketInUse for a Unix socket another daemon serves."""
        if (path := self._listen.path) is not None:
            mode = 0o660 if self._socket_group is not None else 0o600
            sock, self._socket_lock = bind_socket(path, mode, self._socket_group)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        else:
            self._server = await asyncio.start_server(
                self._serve, self._listen.host, self._listen.port, reuse_address=True
            )
            if not self._listen.loopback:
                logger.warning(
                    "the HTTP API listens on %s, beyond this machine: requests and tokens "
                    "cross the network unencrypted unless a TLS proxy is in front",
                    self._listen.host,
                )
        logger.info("HTTP API listening on %s", ", ".join(self.addresses))

    @property
    def addresses(self) -> list[str]:
        """Where it listens (with the port the system chose for port 0)."""
        if self._listen.path is not None or self._server is None:
            return [str(self._listen)]
        names = [sock.getsockname() for sock in self._server.sockets]
        return [str(Listen(host=name[0], port=name[1])) for name in names]

    def reconfigure(self, settings: HttpSettings, access: AccessPolicy) -> None:
        """After a reload: new tokens and access rules apply from the next request on."""
        for setting in restart_only(HttpConfig):
            if getattr(settings.config, setting) != getattr(self._config, setting):
                logger.warning("[http] %s changed; it takes effect at the next restart", setting)
        self._tokens = settings.tokens
        self._access = access

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting; answer requests in progress with 503; close every connection."""
        self._closing = True
        self.stop_accepting()
        for connection in list(self._connections):
            if connection.handling is not None:
                connection.handling.cancel()
            else:
                connection.writer.close()
        if self._serving:  # let them send their last response
            await asyncio.wait(self._serving, timeout=LINGER + 1.0)
        if self._socket_lock is not None and self._listen.path is not None:
            release_socket(self._listen.path, self._socket_lock)
            self._socket_lock = None

    # -- one connection ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (task := asyncio.current_task()) is not None:
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        try:
            connection = self._accept(reader, writer)
        except OSError:
            writer.close()
            return
        if self._listen.path is not None and connection.peer is None:
            logger.warning("refused HTTP connection from %s: not allowed", connection.client)
            message = f"permission denied: this user may not use this taskd; {ACCESS_HINT}"
            await self._close_with(connection, error_response(ErrorCode.PERMISSION_DENIED, message))
            return
        if self._closing or len(self._connections) >= self._config.max_connections:
            logger.warning(
                "refused HTTP connection from %s: %d connections are open (max_connections)",
                connection.client,
                len(self._connections),
            )
            message = "taskd has too many open HTTP connections; try again later"
            busy = error_response(ErrorCode.BUSY, message, headers=(("Retry-After", "1"),))
            await self._close_with(connection, busy)
            return
        self._connections.add(connection)
        try:
            while await self._exchange(connection):
                pass
        except (ConnectionError, OSError, TimeoutError):
            pass  # the client hung up, or did not read its response in time
        finally:
            self._connections.discard(connection)
            self._release(connection)
            writer.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Connection:
        """The connection, with the peer's access on a Unix socket (None: not allowed)."""
        if self._listen.path is None:
            host, port = (writer.get_extra_info("peername") or ("?", 0))[:2]
            return _Connection(reader, writer, None, f"{host}:{port}")
        sock: socket.socket = writer.get_extra_info("socket")
        pid, uid, gid = peer_of(sock)
        peer = self._access.check(pid, uid, gid, lambda: peer_groups(sock, pid, gid))
        return _Connection(reader, writer, peer, f"pid {pid} {user_name(uid)}")

    async def _exchange(self, connection: _Connection) -> bool:
        """One request and its response; whether the connection goes on."""
        try:
            received = await self._receive(connection)
        except _Refusal as exc:
            logger.info("HTTP request from %s refused: %s", connection.client, exc.message)
            await self._close_with(connection, error_response(exc.code, exc.message))
            return False
        if received is None:
            return False
        try:
            response = await self._respond(connection, *received)
        finally:
            self._release(connection)
        await self._send(connection, response)
        if self._closing or connection.protocol.our_state is not h11.DONE:
            return False
        connection.protocol.start_next_cycle()
        return True

    async def _receive(self, connection: _Connection) -> tuple[h11.Request, bytes] | None:
        """The next request and its body; None if the client closed or stayed idle.

        The whole request must arrive within read_timeout: a client that trickles its
        headers or its body gets 408 and is closed, whatever it does meanwhile.
        """
        protocol = connection.protocol
        received = len(protocol.trailing_data[0])  # bytes of this request: head, then body
        started = received > 0
        request: h11.Request | None = None
        body = bytearray()
        try:
            async with asyncio.timeout(self._config.read_timeout):
                while True:
                    event = protocol.next_event()
                    if event is h11.NEED_DATA:
                        data = await connection.reader.read(READ_CHUNK)
                        started = started or bool(data)
                        received += len(data)
                        protocol.receive_data(data)
                    elif isinstance(event, h11.Request):
                        # h11 bounds a head only while it is incomplete; one that arrives
                        # whole is measured here: what was received less the body after it.
                        if received - len(protocol.trailing_data[0]) > MAX_HEAD:
                            raise _Refusal(HttpErrorCode.HEADERS_TOO_LARGE, HEAD_TOO_LARGE)
                        request = event
                        self._admit(connection, event)
                    elif isinstance(event, h11.Data):
                        self._reserve(connection, len(event.data))
                        body += event.data
                        self._check_size(len(body))
                    elif isinstance(event, h11.EndOfMessage) and request is not None:
                        return request, bytes(body)
                    else:  # the client closed the connection
                        return None
        except TimeoutError:
            if not started:
                return None  # an idle connection: closed without a word
            timeout = self._config.read_timeout
            message = f"the request did not arrive within {timeout:g}s (read_timeout); closing"
            raise _Refusal(HttpErrorCode.REQUEST_TIMEOUT, message) from None
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise _Refusal(HttpErrorCode.HEADERS_TOO_LARGE, HEAD_TOO_LARGE) from None
            raise _Refusal(HttpErrorCode.BAD_REQUEST, f"not valid HTTP/1.1: {exc}") from None

    def _admit(self, connection: _Connection, request: h11.Request) -> None:
        """Refuse a body declared too large before reading it; else let it come."""
        connection.method = request.method
        for name, value in request.headers:
            if name == b"content-length":
                self._check_size(int(value))
        if connection.protocol.they_are_waiting_for_100_continue:
            continue_ = h11.InformationalResponse(status_code=100, headers=[])
            connection.writer.write(connection.protocol.send(continue_) or b"")

    def _check_size(self, size: int) -> None:
        if size > self._config.max_body_size:
            raise _Refusal(
                HttpErrorCode.BODY_TOO_LARGE,
                f"the body of {size} bytes is over the limit of {self._config.max_body_size} "
                "(max_body_size); pass a reference to the data instead",
            )

    def _reserve(self, connection: _Connection, size: int) -> None:
        if self._buffered + size > self._budget:
            raise _Refusal(
                ErrorCode.BUSY,
                "taskd is receiving too many large request bodies at once; try again shortly",
            )
        self._buffered += size
        connection.reserved += size

    def _release(self, connection: _Connection) -> None:
        self._buffered -= connection.reserved
        connection.reserved = 0

    async def _respond(
        self, connection: _Connection, head: h11.Request, body: bytes
    ) -> HttpResponse:
        authorization = next((v for k, v in head.headers if k == b"authorization"), None)
        if connection.peer is not None:
            access: str | None = connection.peer.access
            peer = connection.peer
        else:
            access = self._tokens.access(authorization)
            peer = Peer(pid=0, uid=-1, gid=-1, access="full" if access == "full" else "readonly")
        request = HttpRequest(
            method=head.method.decode("ascii", "replace"),
            target=head.target.decode("latin-1"),
            body=body,
            authorization=authorization,
            access=access,
            peer=peer,
            client=connection.client,
        )
        connection.handling = asyncio.ensure_future(self._api.handle(request))
        try:
            response = await connection.handling
        except asyncio.CancelledError:
            if not self._closing:
                raise
            message = "taskd is stopping; a job that was started is kept in the queue"
            response = error_response(ErrorCode.SHUTTING_DOWN, message)
        except Exception as exc:
            logger.exception(
                "HTTP %s %s from %s failed", request.method, request.target, request.client
            )
            response = error_response(ErrorCode.INTERNAL, f"internal error: {exc!r}")
        finally:
            connection.handling = None
        logger.debug(
            "HTTP %s %s from %s: %d",
            request.method,
            request.target,
            request.client,
            response.status,
        )
        return response

    async def _send(
        self, connection: _Connection, response: HttpResponse, *, close: bool = False
    ) -> None:
        """Write the response; a client that does not read it within read_timeout is dropped."""
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Server", SERVER),
            *response.headers,
        ]
        if close or self._closing:
            headers.append(("Connection", "close"))
        protocol = connection.protocol
        reason = http.HTTPStatus(response.status).phrase.encode()
        data = protocol.send(
            h11.Response(status_code=response.status, headers=headers, reason=reason)
        )
        if response.body and connection.method != b"HEAD":
            data = (data or b"") + (protocol.send(h11.Data(data=response.body)) or b"")
        data = (data or b"") + (protocol.send(h11.EndOfMessage()) or b"")
        connection.writer.write(data)
        try:
            async with asyncio.timeout(self._config.read_timeout):
                await connection.writer.drain()
        except TimeoutError:
            connection.writer.transport.abort()
            raise

    async def _close_with(self, connection: _Connection, response: HttpResponse) -> None:
        """Send an error response, then close without losing it (see LINGER)."""
        with suppress(h11.LocalProtocolError, ConnectionError, OSError, TimeoutError):
            await self._send(connection, response, close=True)
            if self._lingering < MAX_LINGERING and connection.writer.can_write_eof():
                self._lingering += 1
                try:
                    connection.writer.write_eof()
                    async with asyncio.timeout(LINGER):
                        dropped = 0
                        while dropped < LINGER_BYTES and (
                            chunk := await connection.reader.read(READ_CHUNK)
                        ):
                            dropped += len(chunk)
                finally:
                    self._lingering -= 1
        connection.writer.close()
