"""Frames for fuzzing taskd's control socket, and a client that throws them at a live daemon.

Hypothesis draws the seed requests (every method, with params of every msgpack type, edge
integers, NaN, odd strings, nesting); a seeded `random.Random` then mutates them at the byte
level (bit flips, overwrites, cuts, splices, deep nesting, bad UTF-8) and, at the end of some
connections, breaks the framing itself (length prefixes that lie, frames cut short or over
the limit). Many frames go down one connection: only a broken frame ends it, and the next
connection starts again with hello.
"""

from __future__ import annotations

import collections
import contextlib
import random
import selectors
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import strategies as st

from taskd.protocol import PROTOCOL_VERSION, ErrorCode

ERROR_CODES = {code.value for code in ErrorCode}
# cancel and retry are left out: they would (correctly) change the jobs the test checks.
TASK_NAMES = ["echo", "typed", "no-such-task", "", "echo ", "ECHO"]
STATUSES = ["pending", "running", "succeeded", "failed", "cancelled"]
EDGE_INTS = [0, 1, -1, 2**31, -(2**31), 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
EDGE_FLOATS = [0.0, -0.0, 1e-300, 1e300, float("inf"), float("-inf"), float("nan")]
INTERESTING_BYTES = [0x00, 0x7F, 0x80, 0x90, 0xA0, 0xC0, 0xC1, 0xC4, 0xCF, 0xD3, 0xD9, 0xDB,
                     0xDC, 0xDD, 0xDE, 0xDF, 0xFF]  # fmt: skip

integers = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from(EDGE_INTS))
small_ints = st.one_of(st.integers(-5, 60), st.sampled_from(EDGE_INTS))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(EDGE_FLOATS))
small_floats = st.one_of(st.floats(-1, 0.05), st.sampled_from(EDGE_FLOATS))
texts = st.one_of(st.text(max_size=12), st.sampled_from(["\x00", "\ud7ff", "é" * 40, "a" * 2000]))
task_names = st.one_of(st.sampled_from(TASK_NAMES), st.text(max_size=10))
scalars = st.one_of(st.none(), st.booleans(), integers, floats, texts, st.binary(max_size=24))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(texts, integers), inner, max_size=4)
    ),
    max_leaves=12,
)


def _params(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[Any]:
    known = st.fixed_dictionaries(required, optional=optional)
    with_extra = st.builds(
        lambda base, extra: {**extra, **base},
        known,
        st.dictionaries(st.text(max_size=8), values, max_size=2),
    )
    return st.one_of(known, known, known, with_extra, values)


enqueue_params = _params(
    {"task": task_names},
    {
        "payload": values,
        "delay": small_floats,
        "run_at": floats,
        "priority": small_ints,
        "max_attempts": small_ints,
        "key": st.one_of(st.none(), texts),
    },
)
PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "hello": _params(
        {"protocol": st.one_of(st.just(PROTOCOL_VERSION), small_ints)}, {"client": texts}
    ),
    "list_tasks": _params({}, {}),
    "run": _params(
        {"task": task_names},
        {
            "payload": values,
            "key": st.one_of(st.none(), texts),
            "detach": st.booleans(),
            "max_attempts": small_ints,
        },
    ),
    "enqueue": enqueue_params,
    "enqueue_many": _params({"jobs": st.lists(enqueue_params, max_size=3)}, {}),
    "job": _params({"id": integers}, {}),
    "jobs": _params(
        {},
        {
            "status": st.lists(st.one_of(st.sampled_from(STATUSES), texts), max_size=3),
            "task": task_names,
            "limit": st.integers(-2, 20),
        },
    ),
    "wait": _params({"id": integers}, {"timeout": small_floats}),
    "status": _params({}, {}),
    "prune": _params({}, {"older_than": floats}),
    "reload": _params({}, {}),
}
# reload rescans the tasks folder, which takes milliseconds: the mutator sends it rarely.
methods = st.sampled_from([name for name in PARAMS if name != "reload"])
RELOAD = msgspec.msgpack.encode({"id": 9, "method": "reload", "params": {}})


def _one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in `n` draws (hypothesis favours boundary values of integers)."""
    return st.sampled_from([False] * (n - 1) + [True])


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    """The msgpack body of a request: usually well formed, sometimes oddly shaped."""
    method = draw(texts) if draw(_one_in(10)) else draw(methods)
    params = draw(PARAMS[method]) if method in PARAMS else draw(values)
    request_id = draw(texts) if draw(_one_in(15)) else draw(integers)
    envelope: dict[Any, Any] = {"id": request_id, "method": method}
    if not draw(_one_in(10)):
        envelope["params"] = params
    if draw(_one_in(15)):
        envelope[draw(texts)] = draw(values)
    if draw(_one_in(30)):
        return msgspec.msgpack.encode(list(envelope.values()))
    if draw(_one_in(30)):
        return msgspec.msgpack.encode(draw(values))
    return msgspec.msgpack.encode(envelope)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


HELLO = frame(msgspec.msgpack.encode({"id": 0, "method": "hello",
                                      "params": {"protocol": PROTOCOL_VERSION}}))  # fmt: skip


class Mutator:
    """Byte-level mutations of request bodies, chosen by a seeded random generator."""

    def __init__(self, rng: random.Random, max_frame: int) -> None:
        self.rng = rng
        self.max_frame = max_frame
        self.kinds: collections.Counter[str] = collections.Counter()

    def body(self, seeds: list[bytes]) -> bytes:
        """A body: a seed left alone or mutated; the frame around it will tell the truth."""
        rng = self.rng
        body = rng.choice(seeds)
        kind = rng.choices(
            ["intact", "bitflip", "overwrite", "insert", "delete", "truncate", "append",
             "splice", "deep", "utf8", "random", "big", "reload"],
            weights=[30, 14, 10, 6, 6, 10, 4, 5, 5, 5, 5, 0.3, 0.05],
        )[0]  # fmt: skip
        self.kinds[kind] += 1
        data = bytearray(body)
        if kind == "bitflip" and data:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "overwrite" and data:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.choice(INTERESTING_BYTES)
        elif kind == "insert":
            at = rng.randint(0, len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == "delete" and data:
            at = rng.randrange(len(data))
            del data[at : at + rng.randint(1, 16)]
        elif kind == "truncate":
            del data[rng.randint(0, len(data)) :]
        elif kind == "append":
            data += rng.randbytes(rng.randint(1, 16))
        elif kind == "splice":
            other = rng.choice(seeds)
            data = data[: rng.randint(0, len(data))] + other[rng.randint(0, len(other)) :]
        elif kind == "deep":
            data = self._deep(data)
        elif kind == "utf8":
            data = self._bad_utf8(data)
        elif kind == "random":
            data = bytearray(rng.randbytes(rng.randint(0, 64)))
        elif kind == "big":  # a large frame (the shared receive budget), never stored
            junk = bytes(rng.randint(70_000, self.max_frame // 2))
            data = bytearray(msgspec.msgpack.encode({"id": 1, "method": "jobs", "junk": junk}))
        elif kind == "reload":
            data = bytearray(RELOAD)
        return bytes(data)

    def _deep(self, data: bytearray) -> bytearray:
        depth = self.rng.choice([100, 900, 990, 1000, 1100, 5000, 60_000])
        opener = self.rng.choice([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"])
        nested = opener * depth + b"\xc0"
        marker = data.find(b"\xa6params")
        if marker >= 0 and self.rng.random() < 0.7:  # the params, or within them the payload
            payload = data.find(b"\xa7payload")
            cut = payload + 8 if payload >= 0 else marker + 7
            return data[:cut] + nested
        return bytearray(nested)

    def _bad_utf8(self, data: bytearray) -> bytearray:
        starts = [i for i, byte in enumerate(data) if 0xA1 <= byte <= 0xBF]
        if not starts:
            return data + b"\xa2\xff\xfe"
        at = self.rng.choice(starts)
        length = data[at] - 0xA0
        for offset in range(1, min(length, 3) + 1):
            if at + offset < len(data):
                data[at + offset] = self.rng.choice([0xFF, 0xC3, 0xED, 0x80, 0xF8])
        return data

    def breaking_frame(self, seeds: list[bytes]) -> bytes:
        """A frame after which the stream cannot be trusted: the connection's last."""
        rng = self.rng
        body = rng.choice(seeds)
        kind = rng.choice(["longer", "shorter", "oversize", "cut", "header"])
        self.kinds[f"break-{kind}"] += 1
        if kind == "longer":  # announces more than follows
            return struct.pack(">I", len(body) + rng.randint(1, 10_000)) + body
        if kind == "shorter":  # the rest is read as the next frame's header
            return struct.pack(">I", rng.randint(0, max(0, len(body) - 1))) + body
        if kind == "oversize":
            return struct.pack(">I", rng.choice([self.max_frame + 1, 2**31, 2**32 - 1]))
        if kind == "cut":
            whole = frame(body)
            return whole[: rng.randint(4, max(4, len(whole) - 1))]
        return frame(body)[: rng.randint(1, 3)]


class Stats:
    """What a fuzzing run sent and what came back."""

    def __init__(self) -> None:
        self.frames = 0
        self.connections = 0
        self.bytes = 0
        self.replies = 0
        self.codes: collections.Counter[str] = collections.Counter()
        self.internal: list[dict[str, Any]] = []


class SocketFuzzer:
    """Sends mutated frames to a live taskd, a connection at a time, reading as it goes."""

    def __init__(self, path: Path, max_frame: int, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.max_frame = max_frame
        self.timeout = timeout
        self.stats = Stats()

    def send_frames(self, seeds: list[bytes], rng: random.Random, count: int) -> Mutator:
        """Send `count` frames made from `seeds`, in connections of a few to 1500 frames."""
        mutator = Mutator(rng, self.max_frame)
        left = count
        while left > 0:
            size = min(left, rng.choice([1, 5, 50, 300, 800, 1500]))
            frames = [frame(mutator.body(seeds)) for _ in range(size)]
            if rng.random() < 0.97:
                frames.insert(0, HELLO)  # mostly: without it, every request is refused
            if rng.random() < 0.3:
                frames.append(mutator.breaking_frame(seeds))
            self._connection(b"".join(frames))
            self.stats.frames += len(frames)
            left -= size
        return mutator

    def _connection(self, data: bytes) -> None:
        """Send `data`, half-close, read every reply until taskd closes; check each reply."""
        self.stats.connections += 1
        self.stats.bytes += len(data)
        received = _exchange(self.path, data, self.timeout)
        offset = 0
        while offset + 4 <= len(received):
            (size,) = struct.unpack_from(">I", received, offset)
            body = received[offset + 4 : offset + 4 + size]
            assert len(body) == size, "taskd sent a truncated reply frame"
            offset += 4 + size
            self._check(body)
        assert offset == len(received), "taskd sent bytes that are not a frame"

    def _check(self, body: bytes) -> None:
        reply = msgspec.msgpack.decode(body)
        assert isinstance(reply, dict) and "id" in reply, reply
        assert ("result" in reply) != ("error" in reply), reply
        self.stats.replies += 1
        if "error" in reply:
            code = reply["error"]["code"]
            assert code in ERROR_CODES, reply
            assert reply["error"]["message"], reply
            self.stats.codes[code] += 1
            if code == ErrorCode.INTERNAL:
                self.stats.internal.append(reply)
        else:
            self.stats.codes["result"] += 1


def _exchange(path: str, data: bytes, timeout: float) -> bytes:
    """Write `data` while reading replies (so neither side blocks), then read to the end."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view = memoryview(data)
    sent = 0
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            events = selector.select(remaining) if remaining > 0 else []
            if not events:
                raise AssertionError(f"taskd did not answer or close within {timeout}s")
            for _, mask in events:
                if mask & selectors.EVENT_WRITE:
                    try:
                        sent += sock.send(view[sent : sent + 262_144])
                    except (BrokenPipeError, ConnectionResetError):
                        sent = len(data)  # taskd closed the stream: read what it said
                    if sent >= len(data):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_WR)
                        selector.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 20)
                    except ConnectionResetError:
                        chunk = b""
                    if not chunk:
                        return bytes(received)
                    received += chunk
    finally:
        selector.close()
        sock.close()


TYPED_TASK = """
import msgspec
from taskd import define_task

class Order(msgspec.Struct):
    item: str
    qty: int
    tags: list[str] = []

@define_task(description="A typed payload")
async def typed(payload: Order) -> int:
    return payload.qty
"""
ECHO_TASK = """
from taskd import define_task

@define_task(description="Return the payload")
async def echo(payload):
    return payload
"""
SENTINEL_TASK = ECHO_TASK.replace("def echo", "def sentinel")


def write_tasks(folder: Path) -> Path:
    """The tasks of a fuzzing daemon: cheap ones, and `sentinel`, which fuzzing never names."""
    folder.mkdir(exist_ok=True)
    (folder / "echo.py").write_text(ECHO_TASK)
    (folder / "typed.py").write_text(TYPED_TASK)
    (folder / "sentinel.py").write_text(SENTINEL_TASK)
    return folder


class Report(msgspec.Struct):
    """The figures of a fuzzing campaign against one daemon."""

    frames: int
    connections: int
    megabytes: float
    replies: int
    seconds: float
    rss_start_kib: int
    rss_baseline_kib: int  # after the warm-up
    rss_peak_kib: int
    rss_end_kib: int
    codes: dict[str, int]
    mutations: dict[str, int]
    internal: list[dict[str, Any]]

    def summary(self) -> str:
        mib = 1024
        return (
            f"{self.frames} frames in {self.connections} connections ({self.megabytes:.0f} MB) "
            f"in {self.seconds:.1f}s, {self.replies} replies; taskd RSS "
            f"{self.rss_start_kib / mib:.1f} MiB at start, {self.rss_baseline_kib / mib:.1f} MiB "
            f"after warm-up, {self.rss_peak_kib / mib:.1f} MiB peak, "
            f"{self.rss_end_kib / mib:.1f} MiB at the end\n"
            f"  replies: {dict(sorted(self.codes.items()))}\n"
            f"  mutations: {dict(sorted(self.mutations.items()))}"
        )


def campaign(
    socket_path: Path,
    pid: int,
    frames: int,
    *,
    max_frame: int,
    warmup: int = 10_000,
    per_example: int = 1_000,
    seed: int | None = None,
) -> Report:
    """Throw at least `frames` frames at the daemon, hypothesis drawing the seed requests."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from tests.support import rss_kib

    fuzzer = SocketFuzzer(socket_path, max_frame)
    mutations: collections.Counter[str] = collections.Counter()
    rss = {"start": rss_kib(pid), "baseline": 0, "peak": 0}
    last_seeds: list[bytes] = []

    def measure() -> None:
        now = rss_kib(pid)
        rss["peak"] = max(rss["peak"], now)
        if not rss["baseline"] and fuzzer.stats.frames >= warmup:
            rss["baseline"] = now

    @settings(
        max_examples=max(1, frames // per_example),
        deadline=None,
        database=None,
        phases=[Phase.generate],  # shrinking a live daemon's history would tell nothing
        suppress_health_check=list(HealthCheck),
        derandomize=seed is None,
    )
    @given(
        seeds=st.lists(request_bodies(), min_size=8, max_size=30),
        rng_seed=st.integers(0, 2**64 - 1),
    )
    def throw(seeds: list[bytes], rng_seed: int) -> None:
        last_seeds[:] = seeds
        mutations.update(fuzzer.send_frames(seeds, random.Random(rng_seed), per_example).kinds)
        measure()

    if seed is not None:
        throw = hypothesis_seed(seed)(throw)
    started = time.monotonic()
    throw()
    top_up = random.Random(seed or 0)
    while fuzzer.stats.frames < frames:  # hypothesis may stop early; the count is promised
        mutations.update(fuzzer.send_frames(last_seeds, top_up, per_example).kinds)
        measure()
    stats = fuzzer.stats
    return Report(
        frames=stats.frames,
        connections=stats.connections,
        megabytes=stats.bytes / 1e6,
        replies=stats.replies,
        seconds=time.monotonic() - started,
        rss_start_kib=rss["start"],
        rss_baseline_kib=rss["baseline"] or rss["start"],
        rss_peak_kib=rss["peak"],
        rss_end_kib=rss_kib(pid),
        codes=dict(stats.codes),
        mutations=dict(mutations),
        internal=stats.internal,
    )
