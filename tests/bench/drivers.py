"""The work each throughput scenario does, run in a process of its own (a real caller).

    python -m tests.bench.drivers SCENARIO [options]   prints one JSON object: what it measured

taskd scenarios talk to a running daemon through taskctl's clients; huey scenarios run
huey's SqliteHuey in this process, as huey is used (its enqueue is a function call, its
consumer threads of the same process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from socket import MSG_WAITALL
from typing import Any

import msgspec

from taskctl import AsyncClient, Client, enqueue_params

FAR = 3600.0  # a delay that keeps enqueued jobs from running while enqueues are measured


async def _enqueue_over(socket: str, jobs: int, connections: int) -> float:
    """Enqueue `jobs` jobs, one per request, each connection sending its next after its reply
    (`socket` may list several daemons, comma-separated: the connections take turns)."""
    sockets = socket.split(",")
    clients = [AsyncClient(sockets[n % len(sockets)]) for n in range(connections)]
    for client in clients:
        await client.connect()

    async def send(client: AsyncClient, count: int) -> None:
        for n in range(count):
            await client.enqueue("noop", n, delay=FAR)

    share, extra = divmod(jobs, connections)
    started = time.perf_counter()
    await asyncio.gather(*(send(c, share + (i < extra)) for i, c in enumerate(clients)))
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.close()
    return elapsed


def taskd_enqueue(socket: str, jobs: int, connections: int) -> dict[str, Any]:
    import uvloop

    seconds = uvloop.run(_enqueue_over(socket, jobs, connections))
    return {"jobs": jobs, "seconds": seconds}


async def _enqueue_many_over(sockets: list[str], jobs: int, batch: int) -> float:
    """Enqueue in batches, one client per daemon, each sending its next after its reply."""
    clients = [AsyncClient(socket) for socket in sockets]
    for client in clients:
        await client.connect()

    async def send(client: AsyncClient, batches: range) -> None:
        for first in batches:
            items = [enqueue_params("noop", n, delay=FAR) for n in range(first, first + batch)]
            await client.enqueue_many(items)

    starts = range(0, jobs, batch)
    started = time.perf_counter()
    await asyncio.gather(*(send(c, starts[i :: len(clients)]) for i, c in enumerate(clients)))
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.close()
    return elapsed


def taskd_enqueue_many(socket: str, jobs: int, batch: int) -> dict[str, Any]:
    if "," in socket:  # several daemons
        import uvloop

        return {
            "jobs": jobs,
            "seconds": uvloop.run(_enqueue_many_over(socket.split(","), jobs, batch)),
        }
    with Client(socket) as client:
        client.status()  # connected before the clock starts
        started = time.perf_counter()
        for first in range(0, jobs, batch):
            items = [enqueue_params("noop", n, delay=FAR) for n in range(first, first + batch)]
            client.enqueue_many(items)
        seconds = time.perf_counter() - started
    return {"jobs": jobs, "seconds": seconds}


def taskd_drain(
    socket: str, jobs: int, batch: int = 1000, pids: str = "", server: int = 0, wait: float = 0.0
) -> dict[str, Any]:
    """Queue `jobs` jobs due at one instant, then time the executors from that instant to
    the end of the last job (both read from the job rows). The jobs are no-ops, or with
    `wait` each awaits asyncio.sleep(wait) (a job waiting on I/O). With the daemons' `pids`
    (comma-separated), also the CPU time they spent meanwhile (`cpu`, seconds: from just
    before that instant until the last job has been waited for); with the PostgreSQL
    postmaster's pid `server`, the CPU time each of its processes spent in that window
    (`server_cpu`, by pid; a process started meanwhile counts whole, one that ended
    meanwhile is not counted), for the caller to pick the processes that served the daemons."""
    from tests.bench.workload import cpu_seconds, server_cpu_seconds

    task, payload = ("hold", {"seconds": wait}) if wait else ("noop", None)
    daemons = [int(pid) for pid in pids.split(",") if pid]
    cpu = 0.0
    server_cpu: dict[int, float] = {}
    with Client(socket) as client:
        due = time.time() + 2.0 + jobs / 10_000  # after every enqueue below has returned
        ids = []
        for first in range(0, jobs, batch):
            count = min(batch, jobs - first)
            items = [
                enqueue_params(task, payload if wait else n, run_at=due)
                for n in range(first, first + count)
            ]
            ids += [inserted.job_id for inserted in client.enqueue_many(items)]
        if time.time() >= due:
            raise RuntimeError("enqueueing took longer than the head start; raise it")
        if daemons or server:
            time.sleep(max(0.0, due - time.time() - 0.02))  # the daemons idle until then
            cpu = -sum(map(cpu_seconds, daemons))
            before = server_cpu_seconds(server)
        last = client.wait(ids[-1], timeout=600)
        if daemons or server:  # before the waits below, which are not the drain's
            cpu += sum(map(cpu_seconds, daemons))
            after = server_cpu_seconds(server)
            server_cpu = {pid: spent - before.get(pid, 0.0) for pid, spent in after.items()}
        for job_id in ids:
            job = client.wait(job_id, timeout=600)
            if job.status != "succeeded":
                raise RuntimeError(f"job {job_id} {job.status}: {job.error}")
            last = job if (job.finished_at or 0) > (last.finished_at or 0) else last
    assert last.finished_at is not None
    return {"jobs": jobs, "seconds": last.finished_at - due, "cpu": cpu, "server_cpu": server_cpu}


def taskd_single_flight(socket: str, callers: int, connections: int, hold: float) -> dict[str, Any]:
    """`callers` runs of the task `hold` (one execution held open for `hold` seconds), sent
    at once over `connections` connections; each reply is stamped as it is read, before
    anything is decoded, then all are checked (one job, succeeded) and the delays from the
    job's end (`finished_at`) to each reply are returned, in seconds, sorted."""
    import selectors
    from socket import AF_UNIX, SOCK_STREAM
    from socket import socket as unix_socket

    from taskctl.client import CLIENT_MAX_FRAME, hello_params
    from taskd.protocol import HEADER, RawReply, Request, RunParams, RunResult, encode_frame

    payload = msgspec.Raw(msgspec.msgpack.encode({"seconds": hold}))
    run = msgspec.Raw(msgspec.msgpack.encode(RunParams("hold", payload)))
    links = []
    for _ in range(connections):
        link = unix_socket(AF_UNIX, SOCK_STREAM)
        link.connect(socket)
        link.sendall(
            encode_frame(Request(0, "hello", msgspec.Raw(msgspec.msgpack.encode(hello_params()))))
        )
        (size,) = HEADER.unpack(link.recv(HEADER.size, MSG_WAITALL))
        link.recv(size, MSG_WAITALL)
        links.append(link)
    share, extra = divmod(callers, connections)
    expected = {}
    for number, link in enumerate(links):
        count = share + (number < extra)
        link.sendall(b"".join(encode_frame(Request(n + 1, "run", run)) for n in range(count)))
        expected[link] = count
    selector = selectors.DefaultSelector()
    buffers = {}
    for link in links:
        link.setblocking(False)
        selector.register(link, selectors.EVENT_READ)
        buffers[link] = bytearray()
    stamped: list[tuple[float, bytes]] = []
    while expected:
        for key, _ in selector.select():
            link = key.fileobj
            chunk = link.recv(1 << 20)
            now = time.time()
            if not chunk:
                raise RuntimeError("taskd closed a connection")
            buffer = buffers[link]
            buffer += chunk
            while len(buffer) >= HEADER.size:
                (size,) = HEADER.unpack_from(buffer)
                if size > CLIENT_MAX_FRAME or len(buffer) < HEADER.size + size:
                    break
                stamped.append((now, bytes(buffer[HEADER.size : HEADER.size + size])))
                del buffer[: HEADER.size + size]
                expected[link] -= 1
                if not expected[link]:
                    del expected[link]
                    selector.unregister(link)
    for link in links:
        link.close()
    replies = msgspec.msgpack.Decoder(RawReply)
    results = msgspec.msgpack.Decoder(RunResult)
    delays, jobs, joined = [], set(), 0
    for received, body in stamped:
        reply = replies.decode(body)
        if reply.error is not None:
            raise RuntimeError(f"a run failed: {reply.error.message}")
        outcome = results.decode(reply.result)
        if outcome.job.status != "succeeded" or outcome.job.finished_at is None:
            raise RuntimeError(f"job {outcome.job.id} {outcome.job.status}")
        jobs.add(outcome.job.id)
        joined += outcome.joined
        delays.append(received - outcome.job.finished_at)
    if len(jobs) != 1:
        raise RuntimeError(
            f"{len(jobs)} executions, not one: callers came after its end; raise --hold"
        )
    return {"jobs": callers, "joined": joined, "delays": sorted(delays)}


def _huey(path: Path) -> Any:
    from huey import SqliteHuey

    huey = SqliteHuey("bench", filename=str(path), fsync=True, store_none=True)

    @huey.task(name="noop")
    def noop(n: int) -> None:
        return None

    return huey, noop


def huey_enqueue(jobs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        huey, noop = _huey(Path(folder) / "huey.db")
        noop(-1)  # the tables exist before the clock starts
        started = time.perf_counter()
        for n in range(jobs):
            noop(n)
        seconds = time.perf_counter() - started
        assert huey.pending_count() == jobs + 1
    return {"jobs": jobs, "seconds": seconds}


def huey_drain(jobs: int, workers: int) -> dict[str, Any]:
    """Queue `jobs` no-op tasks, then time a thread consumer with `workers` workers until the
    result of every one is stored."""
    with tempfile.TemporaryDirectory() as folder:
        huey, noop = _huey(Path(folder) / "huey.db")
        for n in range(jobs):
            noop(n)
        consumer = huey.create_consumer(
            workers=workers, worker_type="thread", periodic=False, initial_delay=0.001,
            backoff=1.0, max_delay=0.001, check_worker_health=False,
        )  # fmt: skip
        started = time.perf_counter()
        consumer.start()
        try:
            while huey.result_count() < jobs:
                time.sleep(0.002)
            seconds = time.perf_counter() - started
        finally:
            consumer.stop(graceful=True)
    return {"jobs": jobs, "seconds": seconds}


def sqlite_floor(jobs: int, batch: int, synchronous: str = "full") -> dict[str, Any]:
    """The raw floor under enqueues: the same rows into taskd's own schema with sqlite3's
    executemany, a transaction per batch (1,000: under enqueue_many; 16: what 16 connections'
    one-job enqueues can share a commit of), with taskd's `synchronous` setting."""
    from taskd.store.sqlite import SqliteStore

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "floor.db"

        async def create() -> None:
            store = SqliteStore(path)
            await store.open()
            await store.close()

        asyncio.run(create())
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        payload = b"\x01"
        started = time.perf_counter()
        for first in range(0, jobs, batch):
            now = time.time()
            rows = [
                ("noop", "enqueue", payload, 0, now + FAR, 3, None, None, now)
                for _ in range(first, first + batch)
            ]
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(
                "INSERT INTO jobs (task, status, origin, payload, priority, run_at,"
                " max_attempts, key, parent_id, created_at)"
                " VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            connection.execute("COMMIT")
        seconds = time.perf_counter() - started
        connection.close()
    return {"jobs": jobs, "seconds": seconds}


async def _outbox_enqueue(url: str, schema: str, jobs: int) -> float:
    """Enqueue one by one with `taskd.outbox` on the application's own asyncpg connection,
    each job its own transaction (outside one, as pgqueuer's enqueue: it commits on its own)."""
    import asyncpg

    import taskd.outbox

    connection = await asyncpg.connect(url)
    started = time.perf_counter()
    for n in range(jobs):
        await taskd.outbox.enqueue(connection, "noop", n, delay=FAR, schema=schema)
    seconds = time.perf_counter() - started
    await connection.close()
    return seconds


def taskd_outbox(url: str, schema: str, jobs: int) -> dict[str, Any]:
    import uvloop

    return {"jobs": jobs, "seconds": uvloop.run(_outbox_enqueue(url, schema, jobs))}


# -- the PostgreSQL peers: each in a schema of its own, default settings, one worker ---------


async def _pgqueuer(url: str, schema: str) -> Any:
    os.environ["PGQUEUER_SCHEMA"] = schema  # read when pgqueuer builds its queries
    import asyncpg
    from pgqueuer.queries import Queries

    connection = await asyncpg.connect(url)
    queries = Queries.from_asyncpg_connection(connection)
    await queries.install()
    return connection, queries


async def _pgqueuer_enqueue(url: str, schema: str, jobs: int, batch: int) -> float:
    connection, queries = await _pgqueuer(url, schema)
    started = time.perf_counter()
    if batch == 1:
        for n in range(jobs):
            await queries.enqueue("noop", str(n).encode())
    else:
        for first in range(0, jobs, batch):
            count = min(batch, jobs - first)
            payloads = [str(n).encode() for n in range(first, first + count)]
            await queries.enqueue(["noop"] * count, payloads, [0] * count)
    seconds = time.perf_counter() - started
    await connection.close()
    return seconds


async def _pgqueuer_drain(url: str, schema: str, jobs: int) -> float:
    from pgqueuer.qm import QueueManager
    from pgqueuer.types import QueueExecutionMode

    connection, queries = await _pgqueuer(url, schema)
    for first in range(0, jobs, 1000):
        count = min(1000, jobs - first)
        await queries.enqueue(["noop"] * count, [b"0"] * count, [0] * count)
    manager = QueueManager(queries)
    done = 0

    @manager.entrypoint("noop")
    async def noop(job: Any) -> None:
        nonlocal done
        done += 1

    started = time.perf_counter()
    await manager.run(mode=QueueExecutionMode.drain)
    seconds = time.perf_counter() - started
    await connection.close()
    if done != jobs:
        raise RuntimeError(f"pgqueuer ran {done} of {jobs} jobs")
    return seconds


def pgqueuer_run(url: str, schema: str, what: str, jobs: int, batch: int) -> dict[str, Any]:
    import uvloop

    if what == "drain":
        return {"jobs": jobs, "seconds": uvloop.run(_pgqueuer_drain(url, schema, jobs))}
    return {"jobs": jobs, "seconds": uvloop.run(_pgqueuer_enqueue(url, schema, jobs, batch))}


async def _procrastinate_run(url: str, schema: str, what: str, jobs: int, batch: int) -> float:
    import psycopg
    from procrastinate import App, PsycopgConnector

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
        await connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    connector = PsycopgConnector(conninfo=url, kwargs={"options": f"-c search_path={schema}"})
    app = App(connector=connector)
    done = 0

    @app.task(name="noop")
    async def noop(n: int) -> None:
        nonlocal done
        done += 1

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        started = time.perf_counter()
        if what == "enqueue" and batch == 1:
            for n in range(jobs):
                await noop.defer_async(n=n)
        else:
            for first in range(0, jobs, batch):
                count = min(batch, jobs - first)
                await noop.batch_defer_async(*({"n": n} for n in range(first, first + count)))
        if what == "drain":
            started = time.perf_counter()
            await app.run_worker_async(wait=False)
            if done != jobs:
                raise RuntimeError(f"procrastinate ran {done} of {jobs} jobs")
        return time.perf_counter() - started


def procrastinate_run(url: str, schema: str, what: str, jobs: int, batch: int) -> dict[str, Any]:
    import uvloop

    seconds = uvloop.run(_procrastinate_run(url, schema, what, jobs, batch))
    return {"jobs": jobs, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "scenario",
        choices=[
            "taskd-enqueue", "taskd-enqueue-many", "taskd-drain", "huey-enqueue", "huey-drain",
            "sqlite-floor", "pgqueuer", "procrastinate", "taskd-single-flight", "taskd-outbox",
        ],
    )  # fmt: skip
    parser.add_argument("--url", help="PostgreSQL, for the PostgreSQL peers")
    parser.add_argument("--schema", help="their schema (created if missing)")
    parser.add_argument("--what", choices=["enqueue", "drain"], default="enqueue")
    parser.add_argument("--socket")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--synchronous", default="full", help="SQLite's, for sqlite-floor")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pid", default="", help="the daemons' (comma-separated): CPU time")
    parser.add_argument("--server", type=int, default=0, help="PostgreSQL's postmaster pid")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds each drained job waits")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds the execution lasts")
    args = parser.parse_args(argv)
    match args.scenario:
        case "taskd-enqueue":
            result = taskd_enqueue(args.socket, args.jobs, args.connections)
        case "taskd-outbox":
            result = taskd_outbox(args.url, args.schema, args.jobs)
        case "taskd-enqueue-many":
            result = taskd_enqueue_many(args.socket, args.jobs, args.batch)
        case "taskd-drain":
            result = taskd_drain(
                args.socket, args.jobs, args.batch, args.pid, args.server, args.wait
            )
        case "huey-enqueue":
            result = huey_enqueue(args.jobs)
        case "huey-drain":
            result = huey_drain(args.jobs, args.workers)
        case "taskd-single-flight":
            result = taskd_single_flight(args.socket, args.jobs, args.connections, args.hold)
        case "sqlite-floor":
            result = sqlite_floor(args.jobs, args.batch, args.synchronous)
        case "pgqueuer":
            result = pgqueuer_run(args.url, args.schema, args.what, args.jobs, args.batch)
        case "procrastinate":
            result = procrastinate_run(args.url, args.schema, args.what, args.jobs, args.batch)
    result["pid"] = os.getpid()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
