"""The HTTP listener: HTTP/1.1 parsed and framed by h11, on the daemon's own asyncio streams.

Why h11 rather than aiohttp's low-level server: h11 is a small, pure-Python, sans-I/O
implementation of HTTP/1.1 (a parser and a state machine, no I/O and no dependencies of its
own), maintained by python-hyper and used under httpx and uvicorn; 0.16 closed its last
request-smuggling hole. It does the HTTP; the accepting, reading and writing happen here, on
the same (uvloop) streams and in the same style as the control socket in taskd/server.py, so
every bound a slow or hostile client can push against is enforced in this module, where the
tests reach it: the size of a request's head (h11's max_incomplete_event_size), the size of a
body before any of it is read (its Content-Length, else counted as chunks arrive), the time
to send a request's line and headers (header_timeout) and the whole request (read_timeout),
the time a kept-alive connection may wait (keepalive_timeout), the body bytes held at once
over all connections, who holds the connections (taskd.http.admission: a flood of
connections without a token cannot crowd out callers with one), and the time to write a
response. aiohttp would bring its own request objects, timeouts, keep-alive policy and
access log, and half a dozen more packages, in place of the one loop below. This module is
imported only when taskd.toml has an `[http]` table.

The listener accepts connections itself (`sock_accept`), one at a time, rather than through
asyncio.start_server, so that it can look at a new connection before the event loop reads
it (whether its first bytes are already there) and stop accepting for a moment while every
connection of the unauthenticated share is one whose request has not been read yet.
"""

from __future__ import annotations

import asyncio
import errno
import http
import logging
import socket
from collections.abc import Coroutine
from contextlib import suppress
from typing import Any, NamedTuple

import h11

import taskd
from taskd.access import AccessPolicy, peer_groups, peer_of, user_name
from taskd.background import Background
from taskd.config import HttpConfig, restart_only
from taskd.connection_limits import RefusalLog
from taskd.http import dashboard as ui
from taskd.http.admission import Admission, Closing
from taskd.http.api import HttpErrorCode
from taskd.http.routes import HttpApi, HttpRequest, HttpResponse, error_response
from taskd.http.settings import HttpSettings, Listen
from taskd.models import HttpStats, Peer
from taskd.protocol import ErrorCode
from taskd.server import ACCESS_HINT, bind_socket, release_socket
from taskd.stream_limits import LINGER, ByteBudget, Lingering
from taskd.traceparent import header_traceparent

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # the request line and the headers
BODY_BUDGET = 64 * 1024 * 1024  # body bytes held at once, over all connections
READ_CHUNK = 64 * 1024
# A connection closed after an error response first reads and drops what its client still
# sends (LINGER_BYTES at most: taskd.stream_limits), so that closing with unread data does
# not reset the connection before the client has read the response.
LINGER_BYTES = 16 * 1024 * 1024
ACCEPT_RETRY = 1.0  # seconds before accept() is tried again after it failed, at most
SERVER = f"taskd/{taskd.__version__}"
HEAD_TOO_LARGE = f"the request line and headers are over {MAX_HEAD} bytes"
BUSY = (
    "taskd has too many open HTTP connections with a token, none of them idle; try again "
    "shortly, or ask its administrator to raise max_connections in [http]"
)


class _Refusal(Exception):
    """Answer the request with this error, then close the connection.

    `counted`: a RefusalLog has counted (and, once a minute, logged) it already.
    """

    def __init__(self, code: str, message: str, *, counted: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.counted = code, message, counted


class _Connection:
    __slots__ = (
        "client",
        "handling",
        "idle",
        "in_head",
        "method",
        "peer",
        "protocol",
        "reader",
        "reserved",
        "streaming",
        "writer",
    )

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
        self.idle = False  # waiting for a request, nothing of it received
        self.in_head = False  # part of a request's line and headers received, not the rest
        self.streaming = False  # sending a `GET /events` stream


class _Received(NamedTuple):
    head: h11.Request
    body: bytes  # empty, and not read, for a connection without a token (see _check_head)


class HttpServer:
    """Serves the HTTP API on a TCP address or a Unix socket."""

    def __init__(
        self,
        api: HttpApi,
        settings: HttpSettings,
        access: AccessPolicy,
        *,
        socket_group: int | None,
        dashboard: ui.Dashboard | None = None,
    ) -> None:
        self._api = api
        self._dashboard = dashboard
        self._config = settings.config
        self._listen = settings.listen
        self._tokens = settings.tokens
        self._access = access
        self._socket_group = socket_group
        self._listeners: list[socket.socket] = []
        self._accepting = Background()
        self._accept_loops: list[asyncio.Task[None]] = []
        self._socket_lock: int | None = None
        self._admission: Admission[_Connection] = Admission(self._config.max_connections)
        self._refusals = RefusalLog("an HTTP connection", logger)
        self._closed_idle = 0
        self._streams = 0  # `GET /events` streams open
        self._refused_streams = 0
        self._stopping = asyncio.Event()  # streams end
        self._connections: set[_Connection] = set()
        self._serving: set[asyncio.Task[None]] = set()  # one per connection, refused ones too
        self._bodies = ByteBudget(max(BODY_BUDGET, self._config.max_body_size))
        self._linger = Lingering(drop_at_most=LINGER_BYTES, chunk=READ_CHUNK)
        self._closing = False

    async def start(self) -> None:
        """Listen; raises OSError, or SocketInUse for a Unix socket another daemon serves."""
        if (path := self._listen.path) is not None:
            mode = 0o660 if self._socket_group is not None else 0o600
            sock, self._socket_lock = bind_socket(path, mode, self._socket_group)
            self._listeners = [sock]
        else:
            self._listeners = await _listen_tcp(self._listen.host, self._listen.port)
            if not self._listen.loopback:
                logger.warning(
                    "the HTTP API listens on %s, beyond this machine: requests and tokens "
                    "cross the network unencrypted unless a TLS proxy is in front",
                    self._listen.host,
                )
        for sock in self._listeners:
            sock.setblocking(False)
            loop = self._accepting.spawn(self._accept_forever(sock), "HTTP accept")
            self._accept_loops.append(loop)
        logger.info("HTTP API listening on %s", ", ".join(self.addresses))

    @property
    def addresses(self) -> list[str]:
        """Where it listens (with the port the system chose for port 0)."""
        if self._listen.path is not None:
            return [str(self._listen)]
        names = [sock.getsockname() for sock in self._listeners]
        return [str(Listen(host=name[0], port=name[1])) for name in names]

    def stats(self) -> HttpStats:
        """The connections and their limits, for `taskctl status`."""
        refused = self._refusals.counts
        return HttpStats(
            open=self._admission.open,
            authenticated=self._admission.authenticated_count,
            max_connections=self._config.max_connections,
            unauthenticated_share=self._admission.share,
            header_timeout=float(self._config.header_timeout),
            keepalive_timeout=float(self._config.keepalive_timeout),
            refused_header_timeout=refused["header_timeout"],
            refused_unauthenticated=refused["unauthenticated_share"],
            refused_busy=refused["max_connections"],
            closed_idle=self._closed_idle,
            event_streams=self._streams,
            max_event_streams=self._max_streams,
            refused_event_streams=self._refused_streams,
            sessions=len(self._dashboard.sessions) if self._dashboard else 0,
            max_sessions=self._dashboard.sessions.max_sessions if self._dashboard else 0,
            sessions_evicted=self._dashboard.sessions.evicted if self._dashboard else 0,
        )

    @property
    def _max_streams(self) -> int:
        """Streams allowed at once: the setting, leaving one connection with a token."""
        return min(self._config.max_event_streams, self._admission.max_authenticated - 1)

    def reconfigure(self, settings: HttpSettings, access: AccessPolicy) -> None:
        """After a reload: new tokens and access rules apply from the next request on."""
        for setting in restart_only(HttpConfig):
            if getattr(settings.config, setting) != getattr(self._config, setting):
                logger.warning("[http] %s changed; it takes effect at the next restart", setting)
        self._tokens = settings.tokens
        self._access = access
        if self._dashboard is not None:
            config = settings.config
            self._dashboard.reconfigure(
                float(config.session_idle), config.trusted_proxies, settings.tokens
            )

    def stop_accepting(self) -> None:
        for loop in self._accept_loops:
            loop.cancel()  # at once: the listening sockets are no longer waited on
        for sock in self._listeners:
            sock.close()

    async def close(self) -> None:
        """Stop accepting; answer requests in progress with 503; close every connection."""
        self._closing = True
        self._stopping.set()  # streams end their responses
        self.stop_accepting()
        await self._accepting.close()
        for connection in list(self._connections):
            if connection.handling is not None:
                connection.handling.cancel()
            elif not connection.streaming:
                connection.writer.close()
        if self._serving:  # let them send their last response
            await asyncio.wait(self._serving, timeout=LINGER + 1.0)
        if self._socket_lock is not None and self._listen.path is not None:
            release_socket(self._listen.path, self._socket_lock)
            self._socket_lock = None

    # -- accepting -----------------------------------------------------------------------

    async def _accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._admission.wait_for_room()
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno != errno.ECONNABORTED:  # else the client gave up first
                    detail = f"cannot accept it: {exc.strerror or exc}"  # out of files, say
                    self._refusals.refused("accept", "a client", detail)
                    await self._admission.wait_for_change(ACCEPT_RETRY)
                continue
            try:
                await self._accept(sock)
            except OSError:
                sock.close()  # the client is gone already

    async def _accept(self, sock: socket.socket) -> None:
        """Count a new connection, make room for it, and serve it in a task of its own."""
        # Its first bytes are there before the event loop has read any of them (a caller
        # sends its request as soon as it is connected): it keeps its place until they are.
        unread = _has_bytes(sock)
        peer, client = self._identify(sock)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        connection = _Connection(reader, writer, peer, client)
        if self._listen.path is not None and peer is None:
            self._spawn(self._refuse_peer(connection))
            return
        closing = self._admission.enter(connection, unread=unread, credential=peer is not None)
        if closing is not None:
            self._close_for_room(closing, connection)
        self._connections.add(connection)
        self._spawn(self._serve(connection))

    def _identify(self, sock: socket.socket) -> tuple[Peer | None, str]:
        """The peer's access on a Unix socket (None: not allowed), and who it is for the log."""
        if self._listen.path is None:
            host, port = (sock.getpeername() or ("?", 0))[:2]
            return None, f"{host}:{port}"
        pid, uid, gid = peer_of(sock)
        peer = self._access.check(pid, uid, gid, lambda: peer_groups(sock, pid, gid))
        return peer, f"pid {pid} {user_name(uid)}"

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    def _close_for_room(self, closing: Closing[_Connection], newcomer: _Connection) -> None:
        """Close a connection at once to make room for `newcomer`."""
        if closing.reason == "unauthenticated_share":
            detail = (
                f"{self._admission.share} connections without a token are open, the share of "
                "max_connections they may hold; closed the oldest to make room for "
                f"{newcomer.client}"
            )
            self._refusals.refused("unauthenticated_share", closing.connection.client, detail)
        else:
            self._closed_idle += 1
        closing.connection.writer.transport.abort()

    async def _refuse_peer(self, connection: _Connection) -> None:
        logger.warning("refused HTTP connection from %s: not allowed", connection.client)
        message = f"permission denied: this user may not use this taskd; {ACCESS_HINT}"
        await self._close_with(connection, error_response(ErrorCode.PERMISSION_DENIED, message))

    # -- one connection ------------------------------------------------------------------

    async def _serve(self, connection: _Connection) -> None:
        try:
            while await self._exchange(connection):
                pass
        except (ConnectionError, OSError, TimeoutError):
            pass  # the client hung up, or did not read its response in time
        finally:
            self._admission.leave(connection)
            self._connections.discard(connection)
            self._release(connection)
            connection.writer.close()

    async def _exchange(self, connection: _Connection) -> bool:
        """One request and its response; whether the connection goes on."""
        try:
            received = await self._receive(connection)
        except _Refusal as exc:
            if not exc.counted:
                logger.info("HTTP request from %s refused: %s", connection.client, exc.message)
            retry = (("Retry-After", "1"),) if exc.code == ErrorCode.BUSY else ()
            await self._close_with(connection, error_response(exc.code, exc.message, None, retry))
            return False
        if received is None:
            return False
        try:
            response = await self._respond(connection, *received)
        finally:
            self._release(connection)
        if connection.protocol.their_state is not h11.DONE:  # its body was not read
            if response.stream is not None:
                response.stream.close()
            await self._close_with(connection, response)
            return False
        if response.stream is not None:
            await self._stream(connection, response)
            return False
        await self._send(connection, response)
        if self._closing or connection.protocol.our_state is not h11.DONE:
            return False
        connection.protocol.start_next_cycle()
        return True

    async def _receive(self, connection: _Connection) -> _Received | None:
        """The next request and its body; None if the client closed or stayed idle.

        Its line and headers must arrive within header_timeout of its first byte (or of the
        previous response, if the client sent more than one request at once), and the whole
        of it within read_timeout: a client that trickles its headers or its body gets 408
        and is closed, whatever it does meanwhile.
        """
        protocol = connection.protocol
        if not protocol.trailing_data[0] and not await self._first_bytes(connection):
            return None
        received = len(protocol.trailing_data[0])  # bytes of this request: head, then body
        loop = asyncio.get_running_loop()
        started = loop.time()
        config = self._config
        head: h11.Request | None = None
        body = bytearray()
        connection.in_head = True
        try:
            async with asyncio.timeout_at(
                started + min(config.header_timeout, config.read_timeout)
            ) as deadline:
                while True:
                    event = protocol.next_event()
                    if event is h11.NEED_DATA:
                        if not (data := await connection.reader.read(READ_CHUNK)):
                            return None  # the client hung up (or was closed for room)
                        received += len(data)
                        protocol.receive_data(data)
                    elif isinstance(event, h11.Request):
                        # h11 bounds a head only while it is incomplete; one that arrives
                        # whole is measured here: what was received less the body after it.
                        if received - len(protocol.trailing_data[0]) > MAX_HEAD:
                            raise _Refusal(HttpErrorCode.HEADERS_TOO_LARGE, HEAD_TOO_LARGE)
                        head = event
                        connection.in_head = False
                        deadline.reschedule(started + config.read_timeout)
                        if not self._check_head(connection, event):
                            return _Received(event, b"")
                    elif isinstance(event, h11.Data):
                        self._reserve(connection, len(event.data))
                        body += event.data
                        self._check_size(len(body))
                    elif isinstance(event, h11.EndOfMessage) and head is not None:
                        return _Received(head, bytes(body))
                    else:  # h11.ConnectionClosed cannot come: an empty read returns first
                        return None
        except TimeoutError:
            raise self._too_slow(connection, head is None) from None
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise _Refusal(HttpErrorCode.HEADERS_TOO_LARGE, HEAD_TOO_LARGE) from None
            raise _Refusal(HttpErrorCode.BAD_REQUEST, f"not valid HTTP/1.1: {exc}") from None
        finally:
            connection.in_head = False

    async def _first_bytes(self, connection: _Connection) -> bool:
        """Wait for the first bytes of the next request, for keepalive_timeout at most;
        False if the client closed the connection or sent nothing."""
        connection.idle = True
        try:
            async with asyncio.timeout(self._config.keepalive_timeout):
                data = await connection.reader.read(READ_CHUNK)
        except TimeoutError:
            self._closed_idle += 1
            return False
        finally:
            connection.idle = False
            self._admission.read(connection)
        connection.protocol.receive_data(data)
        return bool(data)

    def _too_slow(self, connection: _Connection, in_head: bool) -> _Refusal:
        """The 408 for a request that did not arrive in time; a slow head is counted."""
        config = self._config
        if in_head and config.header_timeout < config.read_timeout:
            what, limit, name = "the request line and headers", config.header_timeout, "header"
        else:
            what, limit, name = "the request", config.read_timeout, "read"
        message = f"{what} did not arrive within {limit:g}s ({name}_timeout); closing"
        if not in_head:
            return _Refusal(HttpErrorCode.REQUEST_TIMEOUT, message)
        self._refusals.refused("header_timeout", connection.client, message)
        return _Refusal(HttpErrorCode.REQUEST_TIMEOUT, message, counted=True)

    def _check_head(self, connection: _Connection, request: h11.Request) -> bool:
        """Whether to read the request's body; _Refusal if it may not be made.

        A request with a token moves its connection into the authenticated pool (or, that
        full, gets 503, but for /healthz). On a connection without one, only /healthz can
        succeed, and the answer does not depend on a body: it is not read, and the
        connection is closed after the response.
        """
        connection.method = request.method
        admission = self._admission
        if not admission.authenticated(connection) and self._has_credential(connection, request):
            admitted, closing = admission.authenticate(connection)
            if closing is not None:
                self._close_for_room(closing, connection)
            if not admitted and not self._public(request):
                detail = f"all {admission.max_authenticated} connections with a token are busy"
                self._refusals.refused("max_connections", connection.client, detail)
                raise _Refusal(ErrorCode.BUSY, BUSY, counted=True)
        if not admission.authenticated(connection):
            return not _declares_body(request) or self._signs_in(request)
        for name, value in request.headers:
            if name == b"content-length":
                self._check_size(int(value))
        if connection.protocol.they_are_waiting_for_100_continue:
            continue_ = h11.InformationalResponse(status_code=100, headers=[])
            data = connection.protocol.send(continue_) or b""
            if not connection.writer.is_closing():
                connection.writer.write(data)
        return True

    def _has_credential(self, connection: _Connection, request: h11.Request) -> bool:
        """A token, an allowed peer, or (for a page of the dashboard) a session cookie."""
        if connection.peer is not None:
            return True
        authorization = next((v for k, v in request.headers if k == b"authorization"), None)
        if self._tokens.access(authorization) is not None:
            return True
        return (
            self._dashboard is not None
            and ui.serves(_path(request))
            and self._dashboard.session_of(request.headers) is not None
        )

    def _public(self, request: h11.Request) -> bool:
        """Whether the request needs no credential (`/healthz`, the sign-in page)."""
        method, target = request.method.decode("ascii", "replace"), request.target.decode("latin-1")
        if self._dashboard is not None and ui.serves(_path(request)):
            return self._dashboard.public(method, target)
        return self._api.public(method, target)

    def _signs_in(self, request: h11.Request) -> bool:
        """The dashboard's sign-in form: a small body read without a credential."""
        if self._dashboard is None or not self._dashboard.signs_in(
            request.method.decode("ascii", "replace"), request.target.decode("latin-1")
        ):
            return False
        lengths = [int(v) for k, v in request.headers if k == b"content-length"]
        if not lengths or lengths[0] > ui.SIGN_IN_BODY:
            raise _Refusal(
                HttpErrorCode.BODY_TOO_LARGE,
                f"a sign-in form has {ui.SIGN_IN_BODY} bytes at most, with a Content-Length",
            )
        return True

    def _check_size(self, size: int) -> None:
        if size > self._config.max_body_size:
            raise _Refusal(
                HttpErrorCode.BODY_TOO_LARGE,
                f"the body of {size} bytes is over the limit of {self._config.max_body_size} "
                "(max_body_size); pass a reference to the data instead",
            )

    def _reserve(self, connection: _Connection, size: int) -> None:
        if not self._bodies.take(size):
            raise _Refusal(
                ErrorCode.BUSY,
                "taskd is receiving too many large request bodies at once; try again shortly",
            )
        connection.reserved += size

    def _release(self, connection: _Connection) -> None:
        self._bodies.give_back(connection.reserved)
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
            traceparent=header_traceparent(
                next((v for k, v in head.headers if k == b"traceparent"), None)
            ),
            headers=tuple(head.headers),
        )
        if self._dashboard is not None and ui.serves(_path(head)):
            handling = self._dashboard.handle(request, self._tokens)
        else:
            handling = self._api.handle(request)
        connection.handling = asyncio.ensure_future(handling)
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
        reason = http.HTTPStatus(response.status).phrase.encode()
        events: list[Any] = [
            h11.Response(status_code=response.status, headers=headers, reason=reason)
        ]
        if response.body and connection.method != b"HEAD":
            events.append(h11.Data(data=response.body))
        events.append(h11.EndOfMessage())
        await self._write(connection, events)

    async def _stream(self, connection: _Connection, response: HttpResponse) -> None:
        """Send a response whose body goes on: `GET /events`, until taskd stops or the client
        leaves; a heartbeat comment every event_heartbeat seconds while nothing else comes.
        At most max_event_streams at once (503 past that)."""
        stream = response.stream
        assert stream is not None
        if self._streams >= self._max_streams or self._closing:
            stream.close()
            self._refused_streams += 1
            message = (
                f"{self._max_streams} event streams are open, as many as taskd allows "
                "(max_event_streams in [http]); try again later"
            )
            if self._closing:
                message = "taskd is stopping"
            code = ErrorCode.SHUTTING_DOWN if self._closing else ErrorCode.BUSY
            await self._close_with(
                connection, error_response(code, message, None, (("Retry-After", "5"),))
            )
            return
        self._streams += 1
        connection.streaming = True
        taking: asyncio.Future[bytes] | None = None
        stopping = asyncio.ensure_future(self._stopping.wait())
        # The client says nothing more on this connection: a read ends when it hangs up.
        hangup = asyncio.ensure_future(connection.reader.read(1))
        try:
            headers = [
                ("Content-Type", response.content_type),
                ("Server", SERVER),
                ("Connection", "close"),
                *response.headers,
            ]
            head = h11.Response(status_code=200, headers=headers, reason=b"OK")
            await self._write(connection, [head, h11.Data(data=stream.open())])
            while True:
                taking = taking or asyncio.ensure_future(stream.take())
                await asyncio.wait(
                    (taking, stopping, hangup),
                    timeout=float(self._config.event_heartbeat),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if hangup.done():
                    return  # gone (or it sent more than it may: it is closed all the same)
                if stopping.done():
                    await self._write(connection, [h11.Data(data=b": taskd is stopping\n\n")])
                    break
                if not taking.done():
                    await self._write(connection, [h11.Data(data=b": keepalive\n\n")])
                    continue
                data, taking = taking.result(), None
                if not data:
                    break
                await self._write(connection, [h11.Data(data=data)])
            await self._write(connection, [h11.EndOfMessage()])
        finally:
            for future in (taking, stopping, hangup):
                if future is not None:
                    future.cancel()
                    if future.done() and not future.cancelled():
                        future.exception()  # retrieved: a hang-up is no news
            stream.close()
            self._streams -= 1
            connection.streaming = False

    async def _write(self, connection: _Connection, events: list[Any]) -> None:
        """Send h11 events; a client that does not read them within read_timeout is dropped."""
        data = b"".join(connection.protocol.send(event) or b"" for event in events)
        if connection.writer.is_closing():  # closed to make room for another
            raise ConnectionResetError("the connection was closed")
        connection.writer.write(data)
        try:
            async with asyncio.timeout(self._config.read_timeout):
                await connection.writer.drain()
        except TimeoutError:
            connection.writer.transport.abort()
            raise

    async def _close_with(self, connection: _Connection, response: HttpResponse) -> None:
        """Send an error response, then close without losing it (taskd.stream_limits)."""
        self._admission.leave(connection)  # what is left of it takes no room
        sent = self._send(connection, response, close=True)
        with suppress(h11.LocalProtocolError):
            await self._linger.close_after(connection.reader, connection.writer, sent)


async def _listen_tcp(host: str | None, port: int) -> list[socket.socket]:
    """Listening sockets on each address `host` names (as asyncio.start_server makes them),
    with the longest accept queue the system allows."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in dict.fromkeys(infos):
            sockets.append(socket.create_server(address, family=family, backlog=socket.SOMAXCONN))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _has_bytes(sock: socket.socket) -> bool:
    """Whether the peer has sent something that nobody has read yet."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False


def _path(request: h11.Request) -> str:
    return request.target.decode("latin-1").split("?", 1)[0]


def _declares_body(request: h11.Request) -> bool:
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
        for name, value in request.headers
    )
