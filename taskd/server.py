"""The control socket: frames in, checks, dispatch to a handler, replies out.

Every byte from a client is untrusted. A request that cannot be read gets an error reply;
a stream that cannot be trusted any more (oversized or truncated frame, a client too slow
to finish one) is closed. Nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import math
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol, cast

import msgspec

from taskd.access import AccessPolicy, group_name, peer_groups, peer_of, user_name
from taskd.connection_limits import ConnectionLimits
from taskd.deferred import Deferred
from taskd.envelope import Unreadable, deepest_field, field_path, invalid_string, request_head
from taskd.limits import params_error
from taskd.live import LiveEvents, Subscription
from taskd.models import ConnectionStats, Peer
from taskd.protocol import (
    DEFAULT_MAX_FRAME,
    EMPTY_MAP,
    HEADER,
    JOB,
    MAX_HELLO_FRAME,
    METHODS,
    NIL,
    PROTOCOL_VERSION,
    ErrorCode,
    HelloParams,
    HelloResult,
    JobEvent,
    JobParams,
    Params,
    Reply,
    Request,
    RpcError,
    SubscribeParams,
    SubscribeResult,
    UnsubscribeParams,
    WaitParams,
    encode_frame,
)
from taskd.stream_limits import ByteBudget, Lingering

logger = logging.getLogger(__name__)

# Answers a method the server does not answer itself (taskd.service.Dispatch).
Handler = Callable[[str, Params], Awaitable[Any]]


class AtOnce(Protocol):
    """Answers the methods it names as their requests arrive, without awaiting: a refusal
    (raised), a result, or a Deferred one (taskd.service.Dispatch, from `bind_at_once`)."""

    answered_at_once: frozenset[str]

    def answer_at_once(self, method: str, params: Params) -> Any: ...


# The methods a connection answers itself (declared `connection`): the others go to Handler.
ANSWERED_HERE = (HelloParams, SubscribeParams, UnsubscribeParams)
MAX_IN_FLIGHT = 128  # requests one connection may have outstanding
MAX_SUBSCRIPTIONS = 8  # `subscribe` streams one connection may have open
# Bodies of frames over MAX_HELLO_FRAME bytes are received within a budget shared by all
# connections, so that many clients each sending a frame just under max_frame_size cannot
# make the daemon hold max_connections x max_frame_size bytes.
LARGE_FRAME_BUDGET = 4 * DEFAULT_MAX_FRAME
# At a stop, requests still in flight get this long to finish (a run whose job has just
# ended, say) before they are answered with shutting_down.
REPLY_GRACE = 0.2
# Replies a connection's peer has not read yet, in bytes: over this, taskd reads no more of
# its requests and starts no more of its reads until the peer catches up.
OUTPUT_BUDGET = 1024 * 1024
STOPPING = "taskd is stopping; the job itself is kept in the queue"
ACCESS_HINT = (
    "ask the administrator of taskd to add the user to allow_users, or one of its groups to "
    "allow_groups (readonly_users/readonly_groups for read-only access), in taskd.toml, "
    "then reload taskd"
)

_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError)
_request_decoder = msgspec.msgpack.Decoder(Request)
_params_decoders = {name: msgspec.msgpack.Decoder(m.params) for name, m in METHODS.items()}


class SocketInUse(Exception):
    """Another daemon serves this socket, or the path cannot be used safely."""


def bind_socket(path: Path, mode: int, group: int | None) -> tuple[socket.socket, int]:
    """Listen on a new Unix socket at `path`; returns the socket and a held lock fd.

    The lock (`<path>.lock`) tells a second daemon that this socket is taken, and lets a
    socket file left by a crashed daemon be replaced without a race. `release_socket`
    removes both files again.
    """
    folder = path.parent
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o750 if group is not None else 0o700)
        if group is not None:
            os.chown(folder, -1, group)
    info = folder.stat()
    if info.st_mode & stat.S_IWOTH:
        raise SocketInUse(
            f"the socket's folder {folder} is writable by every user, so another user could "
            "replace the socket; put it in a folder of its own (e.g. /run/taskd)"
        )
    if info.st_mode & stat.S_IWGRP and not info.st_mode & stat.S_ISVTX:
        raise SocketInUse(
            f"the socket's folder {folder} is writable by its group, {group_name(info.st_gid)}, "
            "so a member of that group could replace the socket with one of their own and read "
            f"what callers send; make the folder writable by its owner only (chmod g-w {folder}) "
            f"or set its sticky bit (chmod +t {folder}), or put the socket in another folder"
        )
    if info.st_uid not in (0, os.getuid()):
        raise SocketInUse(
            f"the socket's folder {folder} belongs to uid {info.st_uid}, not to taskd's user, "
            "so its owner could replace the socket; use a folder of taskd's own"
        )
    lock_fd = _lock_socket(path)
    try:
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise SocketInUse(f"{path} exists and is not a socket; remove it or pick another")
            logger.info("replacing stale socket %s left by a daemon that did not stop", path)
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The file is born 0600 (owner only) and opened up to `mode` only once it has its
        # group: at no moment can anyone else connect.
        old_mask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_mask)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
        sock.listen(512)
    except BaseException:
        os.close(lock_fd)
        raise
    return sock, lock_fd


def _lock_socket(path: Path) -> int:
    """Lock `<path>.lock`, the file that is there now: a daemon that stops removes it while
    it holds the lock, so a lock taken on a file no longer at that path is taken again."""
    lock_path = Path(f"{path}.lock")
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW  # no planted symlinks
    while True:
        lock_fd = os.open(lock_path, flags, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise SocketInUse(
                f"another taskd is already serving {path}; stop it first, or give this one "
                "another --socket"
            ) from None
        held = os.fstat(lock_fd)
        try:
            there = lock_path.lstat()
        except FileNotFoundError:
            there = None
        if there is not None and (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
            return lock_fd
        os.close(lock_fd)


def release_socket(path: Path, lock_fd: int) -> None:
    """Remove the socket and its lock file (while still holding the lock), then unlock."""
    for file in (path, Path(f"{path}.lock")):
        try:
            file.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove %s: %s", file, exc.strerror)
    os.close(lock_fd)


class _StreamBroken(Exception):
    """The frame boundaries can no longer be trusted: answer with this error, then close."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Connection(asyncio.Protocol):
    """One control connection: frames are cut from its bytes as they arrive and handed to
    the server (`_dispatch`), within the reads' deadline, one timer moved from frame to
    frame: read_timeout for hello and for a frame begun, idle_timeout while nothing is in
    flight and no frame has begun."""

    __slots__ = (
        "admitted",
        "buffer",
        "ended",
        "frame_until",
        "greeted",
        "held",
        "idle",
        "in_flight",
        "later",
        "loop",
        "opened",
        "output",
        "pause_logged",
        "peer",
        "reads",
        "reads_ended",
        "room",
        "server",
        "size",
        "stalled",
        "subscriptions",
        "timer",
        "timer_at",
        "transport",
        "until",
        "writing_paused",
    )

    transport: asyncio.Transport
    peer: Peer  # once admitted

    def __init__(self, server: ControlServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.admitted = False
        self.opened = loop.time()
        self.greeted = False
        self.in_flight: set[asyncio.Task[None]] = set()
        # Requests to answer with a Deferred result once it is known, by request id.
        self.later: dict[int, Deferred[Any]] = {}
        self.reads = asyncio.Lock()  # reads answered at once (lists, a job): one at a time
        self.output = asyncio.Lock()  # replies go out one at a time, each when there is room
        self.idle = False  # waiting for a frame to begin
        self.pause_logged = False  # the first pause is logged, not every one
        self.subscriptions: dict[int, Subscription] = {}  # by the id of their `subscribe`
        self.buffer = bytearray()  # the part of a frame that has arrived
        self.size: int | None = None  # the body's size once its header is read
        self.held = 0  # bytes of the shared budget held for the frame being received
        self.frame_until = 0.0  # the read deadline of the frame being received
        # A wait that stops the reading (for the frame budget, or for the peer to read its
        # replies), or None.
        self.stalled: asyncio.Task[None] | None = None
        self.ended = False
        self.reads_ended = False  # taskd is stopping: the connection reads no more requests
        self.until: float | None = None  # the reads' deadline (loop time), or none
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        self.writing_paused = False
        self.room: list[asyncio.Future[None]] = []  # waits for the peer to read replies

    @property
    def busy(self) -> bool:
        """Whether requests of this connection wait for their replies."""
        return bool(self.in_flight or self.later)

    @property
    def unsent(self) -> int:
        return self.transport.get_write_buffer_size()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.server._admit_connection(self):
            self.transport.set_write_buffer_limits(high=OUTPUT_BUDGET)
            self.next_frame()

    def data_received(self, data: bytes) -> None:
        if self.ended or self.reads_ended:
            return
        self.buffer += data
        if self.stalled is None:
            self.take_frames()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connection_lost(self)
        for waiter in self.room:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("Connection lost"))
        self.room.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        for waiter in self.room:
            if not waiter.done():
                waiter.set_result(None)
        self.room.clear()

    async def drain(self) -> None:
        """Return once the peer has read its replies down to the transport's low mark."""
        if self.transport.is_closing():
            await asyncio.sleep(0)  # let the connection's loss be told first
        if self.ended:
            raise ConnectionResetError("Connection lost")
        if not self.writing_paused:
            return
        waiter = self.loop.create_future()
        self.room.append(waiter)
        await waiter

    # -- frames in -----------------------------------------------------------------------

    def next_frame(self, begun: bool = False) -> None:
        """Wait for the next frame (`begun`: some of it is here): until hello, within
        read_timeout of connecting; then as long as requests are in flight, or idle_timeout
        if none is; a frame begun, within read_timeout."""
        self.size = None
        if not self.greeted:
            self.frame_until = self.opened + self.server._read_timeout
            self.move(self.frame_until)
        elif begun:
            self.frame_started()
        else:
            self.idle = True
            if self.in_flight or self.later:  # busy: no deadline while requests are in flight
                self.move(None)
            else:
                self.move(self.loop.time() + self.server._idle_timeout)

    def frame_started(self) -> None:
        self.idle = False
        self.frame_until = self.loop.time() + self.server._read_timeout
        self.move(self.frame_until)

    def take_frames(self) -> None:
        """Cut and dispatch every frame the buffer holds; stop at one not all there."""
        server = self.server
        buffer = self.buffer
        start = 0
        try:
            while True:
                if self.size is None:
                    if len(buffer) - start < HEADER.size:
                        if self.idle and len(buffer) > start:
                            self.frame_started()
                        break
                    (size,) = HEADER.unpack_from(buffer, start)
                    # A small frame all here (a request, most often) is cut at once: no read
                    # deadline to set, no limit it can be over, no budget it counts against.
                    if size > server._small_frame or len(buffer) - start - HEADER.size < size:
                        if self.idle:
                            self.frame_started()
                        server._check_size(self, size)
                        if not server._budget.take(size):
                            start = self._wait_for_budget(start, size)
                            return
                        self.held = size
                    self.size = size
                    start += HEADER.size
                size = self.size
                if len(buffer) - start < size:
                    break
                body = bytes(buffer[start : start + size])
                start += size
                if self.held:
                    self.give_back()
                self.size = None
                server._dispatch(self, body)
                if self.ended or self.transport.is_closing():
                    return
                if server._closing:  # taskd is stopping: no requests after this one
                    self.end_reads()
                    return
                if self.transport.get_write_buffer_size() > OUTPUT_BUDGET:
                    self.stall(self._wait_for_output(begun=start < len(buffer)))
                    return
                self.next_frame(begun=start < len(buffer))
        except _StreamBroken as exc:
            server._broken(self, exc)
        finally:
            del buffer[:start]

    def _wait_for_budget(self, start: int, size: int) -> int:
        """The frame's body must wait for room in the shared budget: reading stops, and its
        deadline moves on by the time waited (the wait is not the client's)."""
        self.size = size
        self.move(None)
        self.stall(self._budget_room(size))
        return start + HEADER.size

    async def _budget_room(self, size: int) -> None:
        waited = await self.server._budget.wait_for(size)
        self.held = size
        self.frame_until += waited
        self.move(self.frame_until)

    async def _wait_for_output(self, begun: bool) -> None:
        self.move(None)  # the wait is the server's, not the reads'
        await self.server._output_room(self)
        self.next_frame(begun)

    def stall(self, wait: Awaitable[None]) -> None:
        """Read no more until `wait` is over, then go on with the frames buffered."""
        self.transport.pause_reading()
        self.stalled = self.loop.create_task(self._stalled(wait))

    async def _stalled(self, wait: Awaitable[None]) -> None:
        try:
            await wait
        except ConnectionError:
            return  # cut off for not reading its replies
        self.stalled = None
        if self.ended:
            return
        self.transport.resume_reading()
        self.take_frames()

    def end_reads(self) -> None:
        self.reads_ended = True
        self.move(None)
        self.transport.pause_reading()

    def give_back(self) -> None:
        if self.held:
            self.server._budget.give_back(self.held)
            self.held = 0

    # -- the reads' deadline -------------------------------------------------------------

    def move(self, until: float | None) -> None:
        """Set the reads' deadline; the timer is set again only when it comes earlier."""
        self.until = until
        if until is not None and until < self.timer_at and not self.ended:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = until
            self.timer = self.loop.call_at(until, self._deadline_reached)

    def _deadline_reached(self) -> None:
        set_for = self.timer_at
        self.timer, self.timer_at = None, math.inf
        if self.until is None or self.ended:
            return
        if self.until > set_for:
            self.move(self.until)  # it moved on since the timer was set
            return
        self.server._reads_timed_out(self)

    def end(self) -> None:
        """No more reads: the timer, a stalled wait and budget held go."""
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer, self.timer_at = None, math.inf
        if self.stalled is not None:
            self.stalled.cancel()
            self.stalled = None
        self.give_back()


class ControlServer:
    """Serves the control protocol on a listening Unix socket."""

    def __init__(
        self,
        handler: Handler,
        access: AccessPolicy,
        *,
        server_name: str,
        max_frame: int,
        max_connections: int,
        read_timeout: float,
        max_per_user: int | None = None,
        idle_timeout: float = 300.0,
        live: LiveEvents | None = None,
        at_once: AtOnce | None = None,
    ) -> None:
        self._handler = handler
        self._at_once = at_once
        self._answered_at_once = frozenset() if at_once is None else at_once.answered_at_once
        self._live = live
        self._access = access
        self._server_name = server_name
        self._max_frame = max_frame
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        # The requests each Deferred result is to answer, by connection (see _reply_later).
        self._waiting: dict[Deferred[Any], dict[_Connection, list[int]]] = {}
        self._closing = False
        self._stopping = False  # new connections are refused: the daemon is stopping
        self._linger = Lingering(drop_at_most=MAX_HELLO_FRAME, chunk=4096)
        self._budget = ByteBudget(max(LARGE_FRAME_BUDGET, max_frame), exempt=MAX_HELLO_FRAME)
        # Frames up to this size are within every connection's limit (before hello too) and
        # exempt from the budget.
        self._small_frame = min(max_frame, MAX_HELLO_FRAME)
        self._limits = ConnectionLimits(max_connections, max_per_user or max_connections)
        self._idle_timeout = float(idle_timeout)
        self._closed_idle = 0
        self._closed_unread = 0
        self._refusing: set[asyncio.Task[None]] = set()  # refused connections being closed

    @property
    def connections(self) -> int:
        return len(self._connections)

    def stats(self) -> ConnectionStats:
        """The connections and their limits, for `taskctl status`."""
        unsent = [connection.unsent for connection in self._connections]
        return ConnectionStats(
            open=len(self._connections),
            max_connections=self._max_connections,
            max_per_user=self._limits.max_per_user,
            per_user=dict(self._limits.by_uid),
            idle_timeout=self._idle_timeout,
            output_budget=OUTPUT_BUDGET,
            paused=sum(size > OUTPUT_BUDGET for size in unsent),
            unsent_bytes=sum(unsent),
            refused_busy=self._limits.refused_busy,
            refused_per_user=self._limits.refused_per_user,
            closed_idle=self._closed_idle,
            closed_unread=self._closed_unread,
        )

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self, loop), sock=sock)

    def set_access(self, access: AccessPolicy) -> None:
        """Use a new access policy for connections from now on (after a reload)."""
        self._access = access

    def stop_accepting(self, *, keep_listening: bool) -> None:
        """The daemon is stopping: new connections are told `shutting_down` (so that a caller
        learns why), or, without `keep_listening`, the listening socket is closed (under
        socket activation callers then wait in its queue for the next start). Open
        connections are still served."""
        self._stopping = True
        if self._server is not None and not keep_listening:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting, answer what is in flight with `shutting_down`, close every stream."""
        self._closing = self._stopping = True
        if self._server is not None:
            self._server.close()
        for subscription in [s for c in self._connections for s in c.subscriptions.values()]:
            subscription.close()  # its stream ends with its reply
        in_flight = [task for c in self._connections for task in c.in_flight]
        later = {d.future for c in self._connections for d in c.later.values()}
        if in_flight or later:  # a reply whose job has just ended gets a moment to go out
            await asyncio.wait([*in_flight, *later], timeout=REPLY_GRACE)
        for connection in list(self._connections):
            for request_id in connection.later:
                self._send_error(connection, request_id, ErrorCode.SHUTTING_DOWN, STOPPING)
            connection.later.clear()
            for task in list(connection.in_flight):
                task.cancel()
        for connection in list(self._connections):
            if connection.in_flight:
                await asyncio.wait(connection.in_flight)
            connection.transport.close()
        if self._server is not None:
            with suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    # -- one connection ------------------------------------------------------------------

    def _admit_connection(self, connection: _Connection) -> bool:
        """Whether a new connection is served: its peer may use taskd, taskd is not
        stopping, and the connection limits have room; else it is refused and closed."""
        transport = connection.transport
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, gid = peer_of(sock)
            peer = self._access.check(pid, uid, gid, lambda: peer_groups(sock, pid, gid))
        except OSError:
            transport.close()
            return False
        if peer is None:
            who = user_name(uid)
            logger.warning("refused control connection from %s, pid %d: not allowed", who, pid)
            message = f"permission denied: {who} may not use this taskd; {ACCESS_HINT}"
            self._refuse(connection, ErrorCode.PERMISSION_DENIED, message)
            return False
        if self._stopping:
            message = "taskd is stopping; try again once it is back"
            self._refuse(connection, ErrorCode.SHUTTING_DOWN, message)
            return False
        if (refusal := self._limits.admit(uid)) is not None:
            self._refuse(connection, ErrorCode.BUSY, refusal)
            return False
        connection.peer, connection.admitted = peer, True
        self._connections.add(connection)
        return True

    def _connection_lost(self, connection: _Connection) -> None:
        """The connection is closed, or is to be: what waits for it is let go."""
        if not connection.admitted or connection.ended:
            return
        connection.end()
        self._limits.release(connection.peer.uid)
        self._connections.discard(connection)
        for task in connection.in_flight:
            task.cancel()  # the client is gone; its waits are pointless
        self._forget_later(connection)
        connection.transport.close()

    def _refuse(self, connection: _Connection, code: ErrorCode, message: str) -> None:
        """Send one error frame, then close without losing it (taskd.stream_limits): over
        a stream, as lingering reads what the client still sends."""
        loop, transport = connection.loop, connection.transport
        reader = asyncio.StreamReader(limit=2**16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)

        async def send() -> None:
            writer.write(encode_frame(Reply(None, error=RpcError(code, message).body())))
            await asyncio.wait_for(writer.drain(), 1.0)

        refusing = loop.create_task(self._linger.close_after(reader, writer, send()))
        self._refusing.add(refusing)
        refusing.add_done_callback(self._refusing.discard)

    def _check_size(self, connection: _Connection, size: int) -> None:
        """_StreamBroken if a frame of `size` bytes is over the connection's limit."""
        if connection.greeted:
            if size > self._max_frame:
                message = f"frame of {size} bytes is over the limit of {self._max_frame}; closing"
                raise _StreamBroken(ErrorCode.FRAME_TOO_LARGE, message)
        elif size > (limit := min(self._max_frame, MAX_HELLO_FRAME)):
            message = f"frame of {size} bytes before hello (limit {limit}); closing"
            raise _StreamBroken(ErrorCode.FRAME_TOO_LARGE, message)

    def _broken(self, connection: _Connection, exc: _StreamBroken) -> None:
        """The frame boundaries can no longer be trusted: answer with the error, close."""
        logger.debug("closing connection from %s: %s", connection.peer, exc.message)
        self._send_error(connection, None, exc.code, exc.message)
        self._connection_lost(connection)

    def _reads_timed_out(self, connection: _Connection) -> None:
        """The reads' deadline is reached: a connection idle for idle_timeout is closed, a
        frame (or hello) not completed within read_timeout is refused and closed."""
        if not connection.idle:
            if connection.greeted:
                message = f"frame not completed within {self._read_timeout:g}s; closing"
            else:
                message = f"no hello within {self._read_timeout:g}s of connecting; closing"
            self._broken(connection, _StreamBroken(ErrorCode.BAD_FRAME, message))
            return
        self._closed_idle += 1
        logger.info(
            "closing the connection from %s: idle for %gs with no request in flight (idle_timeout)",
            connection.peer,
            self._idle_timeout,
        )
        self._connection_lost(connection)

    def _dispatch(self, connection: _Connection, body: bytes) -> None:
        try:
            request = _request_decoder.decode(body)
        except _DECODE_ERRORS as exc:
            self._send(connection, _unreadable(body, exc))
            return
        try:
            params = self._admit(connection, request)
        except RpcError as exc:
            self._send(connection, Reply(request.id, error=exc.body()))
            return
        if isinstance(params, HelloParams):
            connection.greeted = True
            hello = HelloResult(
                PROTOCOL_VERSION, self._server_name, os.getpid(), connection.peer.access
            )
            self._send(connection, Reply(request.id, result=hello))
            return
        if request.method in self._answered_at_once:
            # No task: refused or answered now, or (a write) from its commit's future.
            assert self._at_once is not None
            try:
                result = self._at_once.answer_at_once(request.method, params)
            except Exception as exc:  # MemoryError too: the request gets an error, not silence
                self._send(connection, _failed(connection.peer, request.id, request.method, exc))
                return
            if isinstance(result, Deferred):
                self._reply_later(connection, request.id, result)
            else:
                self._send(connection, Reply(request.id, result=result))
            return
        call = self._call(connection, request.id, request.method, params)
        task = connection.loop.create_task(call)
        connection.in_flight.add(task)
        task.add_done_callback(functools.partial(self._finished, connection))

    def _admit(self, connection: _Connection, request: Request) -> Params:
        """The request's params, if this connection may make it now; else RpcError."""
        method = METHODS.get(request.method)
        if method is None:
            raise RpcError(
                ErrorCode.UNKNOWN_METHOD,
                f"unknown method {request.method!r}; methods: {', '.join(METHODS)}",
            )
        raw = request.params if request.params != NIL else EMPTY_MAP
        try:
            params: Params = _params_decoders[request.method].decode(raw)
        except RecursionError:
            raise _too_deep(request.method, bytes(raw)) from None
        except _DECODE_ERRORS as exc:
            raise _invalid_params(request.method, bytes(raw), exc) from None
        if isinstance(params, HelloParams):
            if params.protocol != PROTOCOL_VERSION:
                raise RpcError(
                    ErrorCode.UNSUPPORTED_PROTOCOL,
                    f"this taskd speaks protocol {PROTOCOL_VERSION}, the client "
                    f"{params.protocol}; use a taskctl of the same version",
                )
            return params
        if not connection.greeted:
            raise RpcError(ErrorCode.HELLO_REQUIRED, "the first request must be hello")
        if method.writes and connection.peer.access != "full":
            who = user_name(connection.peer.uid)
            logger.info(
                "refused %s from %s, pid %d: read-only", request.method, who, connection.peer.pid
            )
            raise RpcError(
                ErrorCode.PERMISSION_DENIED,
                f"permission denied: {request.method} changes state, and {who} has read-only "
                f"access to taskd; {ACCESS_HINT}",
            )
        if len(connection.in_flight) + len(connection.later) >= MAX_IN_FLIGHT:
            raise RpcError(
                ErrorCode.BUSY, f"more than {MAX_IN_FLIGHT} requests in flight on one connection"
            )
        return params

    async def _call(
        self, connection: _Connection, request_id: int, method: str, params: Params
    ) -> None:
        try:
            if isinstance(params, SubscribeParams | UnsubscribeParams):
                await self._write(connection, await self._stream(connection, request_id, params))
                return
            declared = METHODS[method]
            if isinstance(params, WaitParams) and params.progress and self._live is not None:
                await self._wait_with_progress(connection, request_id, method, params)
                return
            if declared.writes or declared.waits:
                # Changes are answered in a few bytes; waits must not block each other.
                reply = await self._answer(connection.peer, request_id, method, params)
                await self._reply(connection, request_id, reply)
                return
            # Reads that are answered at once, with replies as large as the store's
            # contents, are worked on one at a time per connection, and only while its peer
            # keeps up with its replies: a peer that reads nothing costs at most about one.
            async with connection.reads:
                await self._output_room(connection)
                reply = await self._answer(connection.peer, request_id, method, params)
                await self._reply(connection, request_id, reply)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            self._send_error(connection, request_id, ErrorCode.SHUTTING_DOWN, STOPPING)
        except ConnectionError:
            pass  # the peer hung up, or was cut off for not reading its replies
        finally:
            # Out of the in-flight count as it ends, not a turn later in `_finished`: its
            # reply is out, and its peer's next requests may be read before that callback.
            connection.in_flight.discard(asyncio.current_task(connection.loop))

    async def _stream(
        self,
        connection: _Connection,
        request_id: int,
        params: SubscribeParams | UnsubscribeParams,
    ) -> Reply:
        """`unsubscribe`; or `subscribe`: events as they come, under the request's id, until
        unsubscribed (or the connection closes), then its reply. A reader that falls behind
        has its events dropped (and is told how many) rather than queued without end."""
        if isinstance(params, UnsubscribeParams):
            ended = connection.subscriptions.get(params.id)
            if ended is not None:
                ended.close()
            return Reply(request_id, result=ended is not None)
        if self._live is None or len(connection.subscriptions) >= MAX_SUBSCRIPTIONS:
            message = f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection"
            return Reply(request_id, error=RpcError(ErrorCode.BUSY, message).body())
        subscription = self._live.subscribe(params.job, params.logs, params.task)
        connection.subscriptions[request_id] = subscription
        try:
            await self._write(connection, Reply(request_id, event=JobEvent("subscribed")))
            while events := await subscription.take():
                for event in events:
                    await self._write(connection, Reply(request_id, event=event))
        finally:
            self._live.unsubscribe(subscription)
            del connection.subscriptions[request_id]
        result = SubscribeResult(events=subscription.sent, dropped=subscription.dropped)
        return Reply(request_id, result=result)

    async def _wait_with_progress(
        self, connection: _Connection, request_id: int, method: str, params: WaitParams
    ) -> None:
        """A `wait` that asked for progress: the job's progress events under the request's
        id while it waits (the latest known first), then its reply."""
        assert self._live is not None
        subscription = self._live.subscribe(params.id, logs=False)
        latest = self._live.latest_progress(params.id)  # at once: what comes next is queued
        forwarding = asyncio.create_task(
            self._forward_progress(connection, request_id, params.id, latest, subscription)
        )
        try:
            reply = await self._answer(connection.peer, request_id, method, params)
            forwarding.cancel()
            await asyncio.gather(forwarding, return_exceptions=True)
            for event in subscription.take_queued():  # the last progress, before the end
                if event.kind == "progress":
                    await self._write(connection, Reply(request_id, event=event))
        finally:
            forwarding.cancel()
            self._live.unsubscribe(subscription)
        assert isinstance(reply, Reply)  # a wait is answered when it ends
        await self._write(connection, reply)

    async def _forward_progress(
        self,
        connection: _Connection,
        request_id: int,
        job_id: int,
        latest: JobEvent | None,
        subscription: Subscription,
    ) -> None:
        assert self._live is not None
        if latest is None and not self._live.knows(job_id):
            latest = await self._stored_progress(job_id)
        if latest is not None:
            await self._write(connection, Reply(request_id, event=latest))
        while events := await subscription.take():
            for event in events:
                if event.kind == "progress":
                    await self._write(connection, Reply(request_id, event=event))

    async def _stored_progress(self, job_id: int) -> JobEvent | None:
        """The progress the store holds of a job this daemon has not heard of (another
        daemon sharing the store may be running it)."""
        try:
            job = await self._handler(JOB.name, JobParams(job_id))
        except RpcError:
            return None  # no such job: the wait says so
        if job.status != "running" or job.progress is None:
            return None
        return JobEvent("progress", job.id, task=job.task, progress=job.progress)

    async def _reply(
        self, connection: _Connection, request_id: int, reply: Reply | Deferred[Any]
    ) -> None:
        """Send the answer to a request, now or (a Deferred result) once it is known."""
        # Called once the answer is there, rather than wrapping the wait for it: a request
        # waiting for its answer (a cancel, for its commit) is one frame less to resume.
        if isinstance(reply, Deferred):
            self._reply_later(connection, request_id, reply)
        else:
            await self._write(connection, reply)

    async def _answer(
        self, peer: Peer, request_id: int, method: str, params: Params
    ) -> Reply | Deferred[Any]:
        try:
            result = await self._handler(method, params)
        except Exception as exc:  # MemoryError too: the request gets an error, not silence
            return _failed(peer, request_id, method, exc)
        return result if isinstance(result, Deferred) else Reply(request_id, result=result)

    def _reply_later(
        self, connection: _Connection, request_id: int, deferred: Deferred[Any]
    ) -> None:
        """Answer the request when `deferred` is known: with every request waiting for it,
        from one callback (`_answer_waiting`)."""
        if deferred.future.done():
            self._send_frame(connection, self._frame_of(deferred, request_id))
            return
        waiting = self._waiting.get(deferred)
        if waiting is None:
            waiting = self._waiting[deferred] = {connection: [request_id]}
            deferred.future.add_done_callback(functools.partial(self._answer_waiting, deferred))
        else:
            waiting.setdefault(connection, []).append(request_id)
        connection.later[request_id] = deferred

    def _forget_later(self, connection: _Connection) -> None:
        """A connection is gone: nothing waits for its replies any more."""
        for deferred in set(connection.later.values()):
            self._waiting.get(deferred, {}).pop(connection, None)
        connection.later.clear()

    def _answer_waiting(self, deferred: Deferred[Any], _: object = None) -> None:
        """Send a Deferred result to every request still waiting for it: encoded once, the
        replies to one connection in one write, each connection's as soon as they are made
        (10,000 callers of one run are answered within milliseconds, none of them woken)."""
        waiting = self._waiting.pop(deferred, None)
        if not waiting:  # its connections are gone
            return
        if len(waiting) == 1:
            ((connection, request_ids),) = waiting.items()
            if len(request_ids) == 1:
                # One request (an enqueue's): its result encoded in its reply, built here
                # (no function to build it made first).
                (request_id,) = request_ids
                if connection.later.pop(request_id, None) is not None:  # else: stopping
                    self._send_frame(connection, self._frame_of(deferred, request_id))
                    self._restart_idle_timer(connection)
                return
        # More share the result encoded once.
        frame_for = self._frames_of(deferred, shared=True)
        for connection, request_ids in waiting.items():
            later = connection.later
            if len(request_ids) == 1:
                if later.pop(request_ids[0], None) is None:  # answered already: stopping
                    continue
                frame = frame_for(request_ids[0])
            else:
                frames = [frame_for(i) for i in request_ids if later.pop(i, None) is not None]
                if not frames:
                    continue
                built = [frame for frame in frames if frame is not None]
                frame = b"".join(built) if len(built) == len(frames) else None
            self._send_frame(connection, frame)
            self._restart_idle_timer(connection)

    def _frame_of(self, deferred: Deferred[Any], request_id: int) -> bytes | None:
        """The reply frame of the one request waiting for a known Deferred result."""
        future = deferred.future
        if future.cancelled() or future.exception() is not None:
            return self._frames_of(deferred, shared=False)(request_id)
        try:
            result = deferred.shape(future.result())
        except (TypeError, ValueError, OverflowError, RecursionError, MemoryError):
            return self._frames_of(deferred, shared=False)(request_id)  # logs it, as before
        return self._frame(Reply(request_id, result=result))

    def _frames_of(self, deferred: Deferred[Any], *, shared: bool) -> Callable[[int], bytes | None]:
        """The reply frame of a request, given its id, for a known Deferred result (to be
        `shared` by more than one request: encoded once for all)."""
        future = deferred.future
        if future.cancelled():
            error = RpcError(ErrorCode.SHUTTING_DOWN, STOPPING).body()
            return lambda request_id: self._frame(Reply(request_id, error=error))
        exc = future.exception()
        if exc is not None:
            failure = deferred.translate(exc)
            if not isinstance(failure, RpcError):
                logger.error("a deferred reply failed", exc_info=exc)
                failure = RpcError(ErrorCode.INTERNAL, f"internal error: {exc!r}")
            body = failure.body()
            return lambda request_id: self._frame(Reply(request_id, error=body))
        try:
            result = deferred.shape(future.result())
            if shared:
                result = msgspec.Raw(msgspec.msgpack.encode(result))
        except (TypeError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
            logger.exception("cannot encode a deferred reply")
            body = RpcError(ErrorCode.INTERNAL, f"the reply could not be encoded: {exc!r}").body()
            return lambda request_id: self._frame(Reply(request_id, error=body))
        return lambda request_id: self._frame(Reply(request_id, result=result))

    async def _write(self, connection: _Connection, reply: Reply) -> None:
        """Send a reply once the connection's unsent replies are under the output budget."""
        if not connection.output.locked() and connection.unsent <= OUTPUT_BUDGET:
            self._send(connection, reply)  # room now, and no reply waits for it before this
            return
        async with connection.output:
            await self._output_room(connection)
            self._send(connection, reply)

    async def _output_room(self, connection: _Connection) -> None:
        """Wait while the connection's unsent replies are over the output budget.

        A peer that has not caught up within idle_timeout is cut off (ConnectionResetError):
        it is not reading, or too slowly, and its replies would hold memory for as long.
        """
        if self._closing or connection.unsent <= OUTPUT_BUDGET:
            return
        if not connection.pause_logged:
            connection.pause_logged = True
            logger.info(
                "pausing requests from %s: %d bytes of replies unsent, over the budget of %d; "
                "its replies are not being read",
                connection.peer,
                connection.unsent,
                OUTPUT_BUDGET,
            )
        try:
            async with asyncio.timeout(self._idle_timeout):
                await connection.drain()
        except TimeoutError:
            if not connection.transport.is_closing():
                self._closed_unread += 1
                logger.warning(
                    "closing the connection from %s: it has not caught up with its replies "
                    "within %gs (idle_timeout); %d bytes unsent",
                    connection.peer,
                    self._idle_timeout,
                    connection.unsent,
                )
                connection.transport.abort()
            raise ConnectionResetError("the peer does not read its replies") from None

    def _finished(self, connection: _Connection, task: asyncio.Task[None]) -> None:
        connection.in_flight.discard(task)
        self._restart_idle_timer(connection)

    def _restart_idle_timer(self, connection: _Connection) -> None:
        """A connection with nothing in flight any more is idle from now."""
        if connection.idle and not (connection.in_flight or connection.later):  # not busy
            connection.move(connection.loop.time() + self._idle_timeout)

    def _send_error(
        self, connection: _Connection, request_id: int | None, code: ErrorCode, message: str
    ) -> None:
        self._send(connection, Reply(request_id, error=RpcError(code, message).body()))

    def _send(self, connection: _Connection, reply: Reply) -> None:
        if connection.transport.is_closing():
            return
        self._send_frame(connection, self._frame(reply))

    def _frame(self, reply: Reply) -> bytes | None:
        """The reply's frame; an error's if it cannot be encoded or is too large; None if
        not even that can be built (out of memory)."""
        try:
            frame = encode_frame(reply)
        except (TypeError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
            logger.exception("cannot encode the reply to request %s", reply.id)
            message = f"the reply could not be encoded: {exc!r}"
            return _error_frame(reply.id, ErrorCode.INTERNAL, message)
        if len(frame) - HEADER.size > self._max_frame:
            size = len(frame)
            message = f"the reply would be {size} bytes, over the limit of {self._max_frame}"
            return _error_frame(reply.id, ErrorCode.FRAME_TOO_LARGE, message)
        return frame

    def _send_frame(self, connection: _Connection, frame: bytes | None) -> None:
        """Write frames (None: they could not be built, and the peer is hung up on)."""
        if connection.transport.is_closing():
            return
        if frame is not None:
            try:
                connection.transport.write(frame)
                return
            except MemoryError:
                pass
        # Not even an error fits: hang up, so that the peer is not left waiting.
        logger.error("out of memory replying to %s; closing its connection", connection.peer)
        connection.transport.abort()


def _failed(peer: Peer, request_id: int, method: str, exc: Exception) -> Reply:
    """The reply to a request whose handler raised: its error; an internal one, logged,
    for an exception that stands for none."""
    if isinstance(exc, RpcError):
        return Reply(request_id, error=exc.body())
    logger.error("%s from %s failed", method, peer, exc_info=exc)
    error = RpcError(ErrorCode.INTERNAL, f"internal error: {exc!r}")
    return Reply(request_id, error=error.body())


def _error_frame(request_id: int | None, code: ErrorCode, message: str) -> bytes | None:
    """An error reply's frame; None if even that cannot be built (out of memory)."""
    try:
        return encode_frame(Reply(request_id, error=RpcError(code, message).body()))
    except MemoryError:
        return None


def _unreadable(body: bytes, exc: Exception) -> Reply:
    """The reply to a body that is not a request: under its id, if that can be read."""
    request_id, method, deepest, params = request_head(body)
    if request_id is None:
        message = f"not a request (a msgpack map of id, method and params): {exc}"
        return Reply(None, error=RpcError(ErrorCode.BAD_FRAME, message).body())
    if isinstance(exc, RecursionError) and deepest == "params" and method in METHODS:
        assert params is not None  # the deepest value is there
        return Reply(request_id, error=_too_deep(method, params).body())
    message = f"not a valid request (a map of id, method and params, nothing else): {exc}"
    return Reply(request_id, error=RpcError(ErrorCode.BAD_FRAME, message).body())


def _too_deep(method: str, params: bytes) -> RpcError:
    """The error for params nested too deeply to decode: `payload_invalid` if the payload
    is (naming the item of an `enqueue_many`), else `invalid_params` naming the field."""
    path, in_payload = deepest_field(params, METHODS[method].params)
    if not in_payload:
        return RpcError(
            ErrorCode.INVALID_PARAMS,
            f"invalid params for {method}: `{field_path(path)}` is nested too deeply",
        )
    message = "the payload is nested too deeply to decode; 500 levels are always accepted"
    items = [step for step in path if isinstance(step, int)]
    if not items:
        return RpcError(ErrorCode.PAYLOAD_INVALID, message)
    item = field_path(path[:-1]).removeprefix("$.")  # jobs[3], as other refusals name it
    return RpcError(ErrorCode.PAYLOAD_INVALID, f"{item}: {message}", {"index": items[-1]})


def _invalid_params(method: str, params: bytes, exc: Exception) -> RpcError:
    """The error for params that do not decode, naming the field at fault: a limit, in
    taskd's words; else msgspec names it, except for a string that is not valid UTF-8."""
    if isinstance(exc, msgspec.ValidationError):
        message = params_error(method, METHODS[method].params, params, exc)
        return RpcError(ErrorCode.INVALID_PARAMS, message)
    found = None
    with suppress(Unreadable):
        found = invalid_string(params, METHODS[method].params)
    if found is None:
        return RpcError(ErrorCode.INVALID_PARAMS, f"invalid params for {method}: {exc}")
    path, is_key = found
    where = f"a key of `{field_path(path)}`" if is_key else f"`{field_path(path)}`"
    return RpcError(
        ErrorCode.INVALID_PARAMS, f"invalid params for {method}: {where} is not valid UTF-8"
    )
