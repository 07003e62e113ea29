"""The daemon: the one place where the parts are built, wired together, started and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import taskd
from taskd.access import AccessPolicy, group_id
from taskd.background import Background
from taskd.config import Config, ConfigError, Paths
from taskd.executor import Executor
from taskd.http.settings import HttpSettings, load_settings
from taskd.live import LiveEvents
from taskd.metrics import Metrics
from taskd.models import HttpStats, counted
from taskd.protocol import ErrorCode, ReloadResult, RpcError
from taskd.scheduler import Scheduler
from taskd.schedules import ScheduleSpec, digest, load_schedules
from taskd.server import ControlServer, SocketInUse, bind_socket, release_socket
from taskd.service import DaemonInfo, Service, Slots, retention_ages
from taskd.store import Store, StoreError, store_for
from taskd.submit import Submitter, max_payload_size
from taskd.systemd import (
    Notifier,
    StatusUpdates,
    inherited_sockets,
    pick_control_socket,
    watchdog_interval,
)
from taskd.tasks import TaskLoadError, TaskRegistry, load_tasks

if TYPE_CHECKING:
    from taskd.http.server import HttpServer

logger = logging.getLogger(__name__)

PRUNE_INTERVAL = 3600.0
SCHEDULES_CHECK_INTERVAL = 60.0  # how often the schedules of the other daemons are compared
# Settings the running daemon cannot change; a reload that changes them warns.
RESTART_ONLY = (
    "log_format",
    "database",
    "node_id",
    "socket",
    "socket_group",
    "workers",
    "max_frame_size",
    "max_connections",
    "max_connections_per_user",
    "read_timeout",
    "idle_timeout",
    "max_stuck_threads",
    "lease",
    "sqlite",
    "postgres",
)

ConfigLoader = Callable[[], tuple[Config, Paths]]


def node_id(config: Config, paths: Paths) -> str:
    """This daemon's name in the job store: `node_id`, else its host and a digest of its
    socket path, stable across restarts (two daemons on one host have two sockets)."""
    if config.node_id:
        return config.node_id
    digest = hashlib.sha256(str(paths.socket).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


class _Settings(NamedTuple):
    """What start-up takes from the configuration, checked."""

    schedules: list[ScheduleSpec]
    access: AccessPolicy
    socket_group: int | None
    file_group: int | None  # [sqlite] group
    http: HttpSettings | None


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Daemon:
    """Lifecycle: `startup()`, serve until a stop signal, `shutdown()`."""

    def __init__(
        self,
        load_config: ConfigLoader,
        config: Config,
        paths: Paths,
        *,
        allow_empty_store: bool = False,
    ) -> None:
        self._load_config = load_config
        self.config = config
        self._started_with = config  # what the restart-only settings are until a restart
        self.paths = paths
        self._allow_empty_store = allow_empty_store
        self.registry: TaskRegistry | None = None
        # Taken out of the environment before any task file is imported.
        self.notifier = Notifier()
        self._watchdog_interval = watchdog_interval()
        self._inherited = inherited_sockets()
        self._status = StatusUpdates(self.notifier, self._summary)
        self._background = Background()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._store: Store | None = None
        self._worker: str | None = None
        self._executor: Executor | None = None
        self._scheduler: Scheduler | None = None
        self._server: ControlServer | None = None
        self._http: HttpServer | None = None
        self._listener: socket.socket | None = None
        self._socket_lock: int | None = None
        self._started_at = time.time()
        self._stopping = False  # shutdown has begun: no more reloads
        self._schedules_digest = ""
        self._differing_nodes: frozenset[tuple[str, str]] = frozenset()

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop cleanly; returns the exit status."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        try:
            return await self._serve()
        finally:
            # Stopped: a signal that comes while the process exits (a second SIGTERM, say)
            # must not kill it by the signal's default action, turning a clean stop into a
            # failure.
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
                signal.signal(signum, signal.SIG_IGN)

    async def _serve(self) -> int:
        try:
            started = await self._start_unless_stopped()
        except StartupError as exc:
            logger.error("cannot start: %s", exc)  # first: what follows is only clean-up
            await self.shutdown(announce=False)
            raise
        except BaseException:
            await self.shutdown()
            raise
        if not started:
            await self.shutdown()
            return 0
        stopped = asyncio.create_task(self._stop.wait())
        crashed = asyncio.create_task(self._background.failed.wait())
        await asyncio.wait([stopped, crashed], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        crashed.cancel()
        await self.shutdown()
        return 1 if self._background.failed.is_set() else 0

    def _registry(self) -> TaskRegistry:
        assert self.registry is not None
        return self.registry

    # -- start ---------------------------------------------------------------------------

    async def _start_unless_stopped(self) -> bool:
        """Start up; if a stop signal comes first, cancel start-up and return False."""
        starting = asyncio.create_task(self.startup(), name="taskd-startup")
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if starting.done():
            starting.result()  # raises StartupError
            return True
        logger.info("stop requested during start-up")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StartupError):
            await starting
        return False

    async def startup(self) -> None:
        settings = self._settings()
        # The socket first: a second taskd on it stops here, before it touches a database.
        listener = self._listen(self.paths, settings.socket_group)
        try:
            await self._start_serving(settings, listener)
        except StoreError as exc:  # a first read or write failed; the message names the store
            raise StartupError(exc.at_start_up) from None

    def _settings(self) -> _Settings:
        """The tasks and what the configuration says, checked (exit 78 if broken)."""
        config = self.config
        try:
            self.registry = load_tasks(self.paths.tasks, config.task)
            return _Settings(
                schedules=load_schedules(config, self.registry),
                access=AccessPolicy.from_config(config),
                socket_group=group_id(config.socket_group) if config.socket_group else None,
                file_group=(
                    group_id(config.sqlite.group, "[sqlite] group") if config.sqlite.group else None
                ),
                http=load_settings(config.http) if config.http is not None else None,
            )
        except (TaskLoadError, ConfigError) as exc:
            raise StartupError(str(exc), exit_code=78) from None

    async def _start_serving(self, settings: _Settings, listener: socket.socket) -> None:
        """Open the store, build the parts, serve the socket, start the background loops."""
        config, paths = self.config, self.paths
        self._store = await self._open_store(paths, settings.file_group)
        self._store.events.on_change(self._status.changed)
        node = node_id(config, paths)
        self._worker = await self._join(self._store, node)
        metrics = Metrics(self._store, http=self._http_stats)
        max_payload = max_payload_size(config.max_frame_size)
        submitter = Submitter(self._store, self._registry, max_payload=max_payload)
        self._executor = Executor(
            self._store,
            self._registry,
            submitter,
            worker=self._worker,
            workers=config.workers,
            lease=config.lease,
            quarantine_after=config.quarantine_after,
            max_result=max_payload,
            max_stuck_threads=config.max_stuck_threads,
            on_attempt=metrics.attempt_ended,
        )
        submitter.claimer = self._executor  # runs and ticks start in the insert's commit
        self._scheduler = Scheduler(
            self._store, submitter, started_at=self._started_at, on_fired=metrics.tick_fired
        )
        await self._scheduler.load(settings.schedules)
        await self._compare_schedules(settings.schedules)
        service = Service(
            store=self._store,
            registry=self._registry,
            submitter=submitter,
            info=DaemonInfo(
                node=node,
                version=taskd.__version__,
                pid=os.getpid(),
                started_at=self._started_at,
                database=self._store.description,
                socket=str(paths.socket),
                tasks_dir=str(paths.tasks),
                workers=config.workers,
            ),
            retention=lambda: self.config.retention,
            reload=self.reload,
            scheduler=self._scheduler,
            connections=lambda: self._server.stats() if self._server else None,
            http=self._http_stats,
            threads=self._executor.thread_stats,
            metrics=metrics.render,
            unwritten_lines=self._executor.activity.pending_lines,
            slots=self._slots,
        )
        self._server = ControlServer(
            service.handle,
            settings.access,
            server_name=f"taskd/{taskd.__version__}",
            max_frame=config.max_frame_size,
            max_connections=config.max_connections,
            read_timeout=config.read_timeout,
            max_per_user=config.max_connections_per_user,
            idle_timeout=config.idle_timeout,
            live=LiveEvents(self._store.events),
        )
        await self._server.start(listener)
        if settings.http is not None:
            await self._start_http(service, settings.http, settings.access, settings.socket_group)
        self._background.spawn(self._executor.run(), "executor")
        self._background.spawn(self._executor.keep_leases(), "leases")
        self._background.spawn(self._scheduler.run(), "scheduler")
        self._background.spawn(self._prune_forever(), "pruner")
        self._background.spawn(self._compare_schedules_forever(), "schedules check")
        if self._watchdog_interval is not None:
            self._background.spawn(self.notifier.keep_watchdog(self._watchdog_interval), "watchdog")
        self._background.spawn(self._status.run(), "status")
        self._ready(await self._summary())
        logger.info(
            "taskd %s ready (pid %d): %s from %s, %s, socket %s",
            taskd.__version__,
            os.getpid(),
            counted(len(self._registry()), "task"),
            paths.tasks,
            self._store.description,
            paths.socket,
        )

    async def _open_store(self, paths: Paths, file_group: int | None) -> Store:
        logger.debug("opening job store %s", paths.database)
        store = store_for(
            paths.database,
            sqlite=self.config.sqlite,
            postgres=self.config.postgres,
            file_group=file_group,
            allow_empty=self._allow_empty_store,
        )
        await store.open()
        return store

    async def _join(self, store: Store, node: str) -> str:
        """Register this start of the node; take back the jobs of workers that are gone,
        our own previous start's among them. Returns our worker id."""
        worker = await store.register_node(node, ttl=self.config.lease)
        recovered = await store.recover(self.config.quarantine_after)
        if recovered:
            failed = sum(job.status == "failed" for job in recovered)
            logger.warning(
                "%s running when taskd last stopped without finishing %s: %d back in the "
                "queue, %d failed (out of attempts or quarantined)",
                counted(len(recovered), "job") + (" was" if len(recovered) == 1 else " were"),
                "it" if len(recovered) == 1 else "them",
                len(recovered) - failed,
                failed,
            )
        logger.info("node %s: worker %s", node, worker)
        return worker

    def _listen(self, paths: Paths, socket_group: int | None) -> socket.socket:
        inherited = pick_control_socket(self._inherited)
        if inherited is not None:
            logger.info("serving the socket systemd passed in")
            self._listener = inherited
            return inherited
        mode = 0o660 if socket_group is not None else 0o600
        try:
            self._listener, self._socket_lock = bind_socket(paths.socket, mode, socket_group)
        except SocketInUse as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot listen on {paths.socket}: {exc}") from None
        return self._listener

    async def _start_http(
        self, service: Service, http: HttpSettings, access: AccessPolicy, group: int | None
    ) -> None:
        from taskd.http.server import HttpServer  # the HTTP library, only with [http]

        self._http = HttpServer(service, http, access, socket_group=group)
        try:
            await self._http.start()
        except SocketInUse as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StartupError(
                f"cannot listen for HTTP on {http.config.listen}: {reason}"
            ) from None

    async def _summary(self) -> str:
        """The STATUS= line systemd shows: running jobs, queue depth, tasks loaded."""
        running = len(self._executor.running_jobs()) if self._executor else 0
        queued = "?"
        if self._store is not None:
            with contextlib.suppress(StoreError):
                queued = str(await self._store.queue_depth())
        tasks = counted(len(self._registry()), "task")
        return f"{running} running, {queued} queued, {tasks} loaded"

    def _ready(self, summary: str) -> None:
        self.notifier.ready(summary)
        self._status.sent(summary)

    # -- background loops ----------------------------------------------------------------

    async def _prune_forever(self) -> None:
        assert self._store is not None
        while True:
            try:
                deleted = await self._store.prune(retention_ages(self.config.retention))
            except StoreError as exc:
                logger.error("pruning old jobs failed: %s", exc)
            else:
                if deleted:
                    logger.info("pruned %d finished jobs past their retention", deleted)
            await asyncio.sleep(PRUNE_INTERVAL)

    async def _compare_schedules_forever(self) -> None:
        while True:
            await asyncio.sleep(SCHEDULES_CHECK_INTERVAL)
            await self._compare_schedules(None)

    async def _compare_schedules(self, specs: list[ScheduleSpec] | None) -> None:
        """Publish a digest of our schedules (new ones, if given) and say loudly when other
        daemons on the store run different ones: then ticks and their state disagree."""
        assert self._store is not None and self._worker is not None
        try:
            if specs is not None:
                self._schedules_digest = digest(specs)
                await self._store.announce_schedules(self._worker, self._schedules_digest)
            nodes = await self._store.nodes()
        except StoreError as exc:
            logger.warning("cannot compare the schedules with the other daemons: %s", exc)
            return
        mine = self._schedules_digest
        differing = frozenset(
            (node.id, node.schedules)
            for node in nodes
            if node.worker != self._worker and node.schedules not in (None, mine)
        )
        if differing and differing != self._differing_nodes:
            others = ", ".join(f"{node} has {theirs}" for node, theirs in sorted(differing))
            logger.error(
                "THE DAEMONS SHARING THIS JOB STORE RUN DIFFERENT SCHEDULES: this one's digest "
                "is %s, %s. Give every daemon the same [scheduled_tasks], [[schedule]] and "
                "timezone settings: a schedule only some of them know fires only while one of "
                "those runs, and its state (paused, last tick) is shared under its id",
                mine,
                others,
            )
        elif not differing and self._differing_nodes:
            logger.info("the daemons sharing this job store now run the same schedules")
        self._differing_nodes = differing

    # -- reload --------------------------------------------------------------------------

    def _reload_in_background(self) -> None:
        if self._server is None or self._stopping:
            state = "stopping" if self._stopping else "still starting"
            logger.warning("SIGHUP ignored: taskd is %s", state)
            return

        async def reload() -> None:
            with contextlib.suppress(RpcError):  # logged; the old configuration stays
                await self.reload()

        self._background.spawn(reload(), "reload")

    async def reload(self) -> ReloadResult:
        """Re-read the configuration and the tasks folder; on any error keep the old ones."""
        async with self._reload_lock:
            if self._stopping:
                raise RpcError(ErrorCode.SHUTTING_DOWN, "taskd is stopping; nothing was reloaded")
            self.notifier.reloading()
            try:
                return await self._reload()
            finally:
                # systemd waits for READY=1 after RELOADING=1, whatever the outcome.
                self._ready(await self._summary())

    async def _reload(self) -> ReloadResult:
        try:
            config, paths = self._load_config()
            registry = load_tasks(paths.tasks, config.task)
            schedules = load_schedules(config, registry)
            access = AccessPolicy.from_config(config)
            http = load_settings(config.http) if config.http is not None else None
        except (ConfigError, TaskLoadError) as exc:
            logger.error("reload failed, the running configuration stays: %s", exc)
            raise RpcError(
                ErrorCode.RELOAD_FAILED,
                f"reload failed; the running configuration stays in place:\n{exc}",
            ) from None
        restart_needed = [
            setting
            for setting in RESTART_ONLY
            if getattr(config, setting) != getattr(self._started_with, setting)
        ]
        for setting in restart_needed:
            logger.warning("%s changed; it takes effect at the next restart", setting)
        self.config, self.registry = config, registry
        self.paths = Paths(
            tasks=paths.tasks, database=self.paths.database, socket=self.paths.socket
        )
        if self._server is not None:
            self._server.set_access(access)
        if self._http is not None and http is not None:
            self._http.reconfigure(http, access)
        elif (self._http is None) != (http is None):
            logger.warning("[http] was added or removed; that takes effect at the next restart")
            restart_needed.append("[http]")
        if self._scheduler is not None:
            await self._scheduler.replace(schedules)
            await self._compare_schedules(schedules)
        logging.getLogger().setLevel(config.log_level.upper())
        logger.info("reloaded: %s from %s", counted(len(registry), "task"), paths.tasks)
        return ReloadResult(len(registry), len(schedules), restart_needed)

    # -- stop ----------------------------------------------------------------------------

    async def shutdown(self, *, announce: bool = True) -> None:
        """Stop accepting, let running jobs finish (then return them), close the store.

        Without `announce` (a start-up that failed) "stopping" and "stopped" are debug lines.
        """
        self._stopping = True
        level = logging.INFO if announce else logging.DEBUG
        self.notifier.stopping()
        logger.log(level, "stopping")
        if self._server is not None:
            self._server.stop_accepting(keep_listening=self._socket_lock is not None)
        if self._http is not None:
            self._http.stop_accepting()
        if self._scheduler is not None:
            await self._scheduler.stop()
        if self._executor is not None:
            await self._executor.drain(self.config.grace_period)
        if self._server is not None:
            await self._server.close()
        if self._http is not None:
            await self._http.close()
        await self._background.close()
        if self._store is not None:
            if self._worker is not None:
                try:
                    await self._store.leave(self._worker)
                except StoreError as exc:  # its heartbeat expires instead
                    logger.warning("cannot sign off from the job store: %s", exc)
            await self._store.close()
        if self._server is None and self._listener is not None:
            self._listener.close()  # start-up failed before it was served
        if self._socket_lock is not None:
            release_socket(self.paths.socket, self._socket_lock)
            self._socket_lock = None
        self.notifier.close()
        logger.log(level, "stopped")

    def _http_stats(self) -> HttpStats | None:
        return self._http.stats() if self._http is not None else None

    def _slots(self) -> Slots:
        executor = self._executor
        if executor is None:
            return Slots(0, self.config.workers, True)
        return Slots(
            executor.busy,
            executor.workers,
            executor.stopping,
            worker=executor.worker,
            running=frozenset(job.id for job in executor.running_jobs()),
            claimed_ahead=executor.claimed_ahead,
            ending=executor.ending,
        )

    def threads_alive(self) -> int:
        return self._executor.threads_alive() if self._executor is not None else 0
