"""The daemon: the one place where the parts are built, wired together, started and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

import taskd
from taskd.access import AccessPolicy, group_id
from taskd.activity import ActivityRecorder
from taskd.attempt import Attempts
from taskd.background import Background
from taskd.config import Config, ConfigError, Paths, restart_only
from taskd.executor import AttemptObserver, Executor
from taskd.http.settings import HttpSettings, load_settings
from taskd.leases import LeaseKeeper
from taskd.limits import max_payload_size
from taskd.live import LiveEvents
from taskd.metrics import Metrics
from taskd.models import ConnectionStats, HttpStats, ThreadStats, WebhookRule, counted
from taskd.news import DaemonNews
from taskd.peers import PeerSchedules
from taskd.protocol import ErrorCode, ReloadResult, RpcError
from taskd.runtime import Runtime
from taskd.scheduler import Scheduler
from taskd.schedules import ScheduleSpec, load_schedules
from taskd.server import ControlServer, SocketInUse, bind_socket, release_socket
from taskd.service import (
    DaemonInfo,
    Dispatch,
    JobMethods,
    NodeMethods,
    ScheduleMethods,
    SlotState,
    StatusMethods,
    retention_ages,
)
from taskd.slots import Slots
from taskd.store import Store, StoreError, store_for
from taskd.submit import Submitter
from taskd.systemd import (
    Notifier,
    StatusUpdates,
    inherited_sockets,
    pick_control_socket,
    watchdog_interval,
)
from taskd.tasks import TaskLoadError, TaskRegistry
from taskd.threads import TaskThreads
from taskd.webhooks import load_tasks_and_webhooks

if TYPE_CHECKING:
    from taskd.http.server import HttpServer
    from taskd.otel import Tracing

logger = logging.getLogger(__name__)

PRUNE_INTERVAL = 3600.0

ConfigLoader = Callable[[], tuple[Config, Paths]]
# The collector's thresholds once started: a young collection after 10,000 new objects, not
# 700 (at 700, a drain of 5,000 no-op jobs ran 55 young and 5 middle collections, each reading
# the jobs in flight: 2 us of CPU per job; at 10,000, one).
GC_THRESHOLDS = (10_000, 10, 10)


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


class Engine(NamedTuple):
    """The parts that run this daemon's jobs, built as `build_engine` wires them."""

    slots: Slots
    submitter: Submitter
    activity: ActivityRecorder
    threads: TaskThreads
    executor: Executor
    leases: LeaseKeeper

    async def stop(self, grace: float) -> None:
        """Let running jobs finish for `grace` seconds, then return them to the queue."""
        await self.executor.drain(grace)
        self.threads.close()


def build_engine(
    store: Store,
    tasks: TaskRegistry,
    news: DaemonNews,
    worker: str,
    config: Config,
    *,
    on_attempt: AttemptObserver | None = None,
    tracing: Tracing | None = None,
) -> Engine:
    """The worker's slots, the submitter that claims for them in its inserts, and the
    executor that runs what they hold, each given what it needs."""
    max_payload = max_payload_size(config.max_frame_size)
    slots = Slots(store, tasks, worker=worker, workers=config.workers, lease=config.lease)
    submitter = Submitter(store, tasks, slots, max_payload=max_payload)
    activity = ActivityRecorder(store, news)
    threads = TaskThreads(config.workers, config.max_stuck_threads)
    runtime = Runtime(submitter, slots, activity)
    attempts = Attempts(
        tasks, runtime, threads, worker=worker, max_result=max_payload, tracing=tracing
    )
    executor = Executor(store, slots, attempts, activity, news, on_attempt=on_attempt)
    leases = LeaseKeeper(store, slots, executor, tasks, quarantine_after=config.quarantine_after)
    return Engine(slots, submitter, activity, threads, executor, leases)


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _settle_heap() -> None:
    """What start-up built (modules, tasks, the parts) lives as long as the daemon: out of the
    collector's sight, a full collection reads only what came after it (one in each 5,000
    no-op jobs read all of it: 2-3 us of CPU per job)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Daemon:
    """Lifecycle: `startup()`, serve until a stop signal, `shutdown()`."""

    def __init__(
        self,
        load_config: ConfigLoader,
        config: Config,
        paths: Paths,
        *,
        allow_empty_store: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self._load_config = load_config
        self._tracing = tracing
        self.config = config
        self._started_with = config  # what the restart-only settings are until a restart
        self.paths = paths
        self._allow_empty_store = allow_empty_store
        self.tasks: TaskRegistry | None = None  # what a reload loads is put in this one
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
        self._engine: Engine | None = None
        self._scheduler: Scheduler | None = None
        self._server: ControlServer | None = None
        self._http: HttpServer | None = None
        self._listener: socket.socket | None = None
        self._live: LiveEvents | None = None
        self._socket_lock: int | None = None
        self._started_at = time.time()
        self._stopping = False  # shutdown has begun: no more reloads
        self._peers: PeerSchedules | None = None
        self._webhooks: tuple[WebhookRule, ...] = ()  # [[webhook]], for the store's writes

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop cleanly; returns the exit status."""
        loop = asyncio.get_running_loop()
        actions: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self._stop.set,
            signal.SIGINT: self._stop.set,
            signal.SIGHUP: self._reload_in_background,
        }

        pending: set[int] = set()  # signals of one kind coalesce until handled, as Unix does

        def on_signal(signum: int, _frame: object) -> None:
            if signum not in pending:
                pending.add(signum)
                loop.call_soon_threadsafe(handle, signum)

        def handle(signum: int) -> None:
            pending.discard(signum)
            actions[signum]()

        # Handlers of our own rather than the loop's: removing a loop's handler puts back the
        # signal's default action for an instant, and a SIGTERM in that instant (a second one,
        # from an impatient operator or a harness) would kill taskd as it exits cleanly. The
        # loop still wakes up for them: it reads the wakeup fd that every signal writes to.
        for signum in actions:
            signal.signal(signum, on_signal)
        try:
            return await self._serve()
        finally:
            # Stopped: a signal that comes while the process exits is ignored, in one step.
            for signum in actions:
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

    def _tasks(self) -> TaskRegistry:
        assert self.tasks is not None
        return self.tasks

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
            self.tasks, self._webhooks = load_tasks_and_webhooks(self.paths.tasks, config)
            return _Settings(
                schedules=load_schedules(config, self.tasks),
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
        store = self._store = await self._open_store(paths, settings.file_group)
        store.webhooks = self._webhooks
        await self._rekey(store, self._tasks().limit_keys())
        news = DaemonNews()
        store.events.on_change(news.changed)  # the store's changes and ours, on one bus
        self._status.follow(news.on_change)
        node = node_id(config, paths)
        worker = self._worker = await self._join(store, node)
        tasks = self._tasks()
        metrics = Metrics(store, self, tasks=tasks)
        engine = self._engine = build_engine(
            store,
            tasks,
            news,
            worker,
            config,
            on_attempt=metrics.attempt_ended,
            tracing=self._tracing,
        )
        self._scheduler = Scheduler(
            store,
            engine.submitter,
            started_at=self._started_at,
            on_fired=metrics.tick_fired,
            tracing=self._tracing,
        )
        await self._scheduler.load(settings.schedules)
        peers = self._peers = PeerSchedules(store, worker)
        await peers.announce(settings.schedules)
        status = StatusMethods(store, tasks, self._info(node, store), self)
        dispatch = Dispatch(
            JobMethods(store, engine.submitter, tasks, engine.activity, status.why).bindings(),
            ScheduleMethods(self._scheduler, tasks, store).bindings(),
            status.bindings(),
            NodeMethods(store, self, metrics).bindings(),
        )
        live = self._live = LiveEvents(store.events, news, store.job_activity)
        await self._serve_socket(dispatch, live, settings, listener)
        if settings.http is not None:
            await self._start_http(dispatch, status, settings)
        self._start_background(engine, self._scheduler, peers)
        _settle_heap()
        self._ready(await self._summary())
        logger.info(
            "taskd %s ready (pid %d): %s from %s, %s, socket %s",
            taskd.__version__,
            os.getpid(),
            counted(len(tasks), "task"),
            paths.tasks,
            store.description,
            paths.socket,
        )

    def _info(self, node: str, store: Store) -> DaemonInfo:
        return DaemonInfo(
            node=node,
            version=taskd.__version__,
            pid=os.getpid(),
            started_at=self._started_at,
            database=store.description,
            socket=str(self.paths.socket),
            tasks_dir=str(self.paths.tasks),
            workers=self.config.workers,
        )

    async def _serve_socket(
        self, dispatch: Dispatch, live: LiveEvents, settings: _Settings, listener: socket.socket
    ) -> None:
        """Serve the control socket."""
        config = self.config
        self._server = ControlServer(
            dispatch,
            settings.access,
            server_name=f"taskd/{taskd.__version__}",
            max_frame=config.max_frame_size,
            max_connections=config.max_connections,
            read_timeout=config.read_timeout,
            max_per_user=config.max_connections_per_user,
            idle_timeout=config.idle_timeout,
            live=live,
            at_once=dispatch,
        )
        await self._server.start(listener)

    def _start_background(self, engine: Engine, scheduler: Scheduler, peers: PeerSchedules) -> None:
        self._background.spawn(engine.executor.run(), "executor")
        self._background.spawn(engine.leases.run(), "leases")
        self._background.spawn(scheduler.run(), "scheduler")
        self._background.spawn(self._prune_forever(), "pruner")
        self._background.spawn(peers.compare_forever(), "schedules check")
        if self._watchdog_interval is not None:
            self._background.spawn(self.notifier.keep_watchdog(self._watchdog_interval), "watchdog")
        self._background.spawn(self._status.run(), "status")

    async def _open_store(self, paths: Paths, file_group: int | None) -> Store:
        logger.debug("opening job store %s", paths.database)
        store = store_for(
            paths.database,
            sqlite=self.config.sqlite,
            postgres=self.config.postgres,
            file_group=file_group,
            allow_empty=self._allow_empty_store,
        )
        await self.notifier.starting(
            store.open(), "opening the job store (a new version of taskd migrates it once)"
        )
        return store

    async def _join(self, store: Store, node: str) -> str:
        """Register this start of the node; take back the jobs of workers that are gone,
        our own previous start's among them. Returns our worker id."""
        worker = await store.register_node(node, ttl=self.config.lease, slots=self.config.workers)
        hooks = self._tasks().failure_hooks()
        recovered = await store.recover(self.config.quarantine_after, hooks)
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
        self, dispatch: Dispatch, status: StatusMethods, settings: _Settings
    ) -> None:
        from taskd.http.routes import HttpApi  # the HTTP library, only with [http]
        from taskd.http.server import HttpServer

        http = settings.http
        assert http is not None
        api = HttpApi(dispatch, status.healthy, self._tasks(), self._live)
        dashboard = None
        if http.config.dashboard:
            from taskd.http.dashboard import Dashboard
            from taskd.http.sessions import Sessions

            assert self._store is not None
            sessions = Sessions(http.config.max_sessions, float(http.config.session_idle))
            dashboard = Dashboard(
                dispatch,
                self._live,
                self._store.finished_recently,
                sessions,
                http.config.trusted_proxies,
            )
        self._http = HttpServer(
            api, http, settings.access, socket_group=settings.socket_group, dashboard=dashboard
        )
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
        running = len(self._engine.slots.running) if self._engine else 0
        queued = "?"
        if self._store is not None:
            with contextlib.suppress(StoreError):
                queued = str(await self._store.queue_depth())
        tasks = counted(len(self._tasks()), "task")
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
            registry, webhooks = load_tasks_and_webhooks(paths.tasks, config)
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
            for setting in restart_only(Config)
            if getattr(config, setting) != getattr(self._started_with, setting)
        ]
        for setting in restart_needed:
            logger.warning("%s changed; it takes effect at the next restart", setting)
        self.config = config
        self._tasks().replace(registry)
        not_keyed: StoreError | None = None
        if self._store is not None:
            self._store.webhooks = webhooks
            try:
                await self._rekey(self._store, registry.limit_keys())
            except StoreError as exc:  # the rest of the reload still applies
                not_keyed = exc
        if self._engine is not None:  # its limits may hold back fewer jobs now
            self._engine.executor.limits_changed()
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
        if self._scheduler is not None and self._peers is not None:
            await self._scheduler.replace(schedules)
            await self._peers.announce(schedules)
        logging.getLogger().setLevel(config.log_level.upper())
        logger.info("reloaded: %s from %s", counted(len(registry), "task"), paths.tasks)
        if not_keyed is not None:
            message = (
                "reloaded, but the queued jobs of a task whose limit_key changed could not be"
                f" keyed again ({not_keyed}); they wait until they are: run `taskctl reload`"
                " again once the store answers"
            )
            logger.error("%s", message)
            raise RpcError(ErrorCode.STORE_ERROR, message)
        return ReloadResult(len(registry), len(schedules), restart_needed)

    @staticmethod
    async def _rekey(store: Store, limit_keys: Mapping[str, str]) -> None:
        """The configuration's `limit_key` paths, at a start or a reload: the jobs already
        queued of the tasks whose path differs from the one the store says they were keyed
        by count under their new values from now on, as those inserted from now on. A store
        error is raised (a start fails, a reload says so): the jobs of a task that gained a
        path have no value until they are keyed (the store's record stays as it was, so the
        next start or reload keys them)."""
        store.limit_keys = limit_keys
        keyed_by = await store.limit_key_paths()
        changed = sorted(
            task
            for task in keyed_by.keys() | limit_keys.keys()
            if keyed_by.get(task) != limit_keys.get(task)
        )
        for task in changed:
            logger.info(
                "task %s: limit_key %s (its queued jobs were keyed by %s): keying them again",
                task, limit_keys.get(task, "none"), keyed_by.get(task, "none"),
            )  # fmt: skip
            await store.rekey(task, limit_keys.get(task))

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
        if self._engine is not None:
            await self._engine.stop(self.config.grace_period)
        if self._server is not None:
            await self._server.close()
        if self._http is not None:
            await self._http.close()
        await self._background.close()
        if self._live is not None:
            await self._live.close()
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

    # -- what the daemon tells of its parts (taskd.service.Node, taskd.metrics.Listeners) --

    def slots(self) -> SlotState:
        if self._engine is None:
            return SlotState(0, self.config.workers, True)
        slots = self._engine.slots
        return SlotState(
            slots.busy,
            slots.workers,
            slots.stopping,
            worker=slots.worker,
            running=frozenset(slots.running),
            claimed_ahead=slots.claimed_ahead,
            ending=self._engine.executor.ending,
        )

    def connections(self) -> ConnectionStats | None:
        return self._server.stats() if self._server is not None else None

    def http(self) -> HttpStats | None:
        return self._http.stats() if self._http is not None else None

    def threads(self) -> ThreadStats | None:
        return self._engine.threads.stats() if self._engine is not None else None

    def threads_alive(self) -> int:
        """Task threads still running (plain functions that ignored their cancellation)."""
        return self._engine.threads.busy if self._engine is not None else 0
