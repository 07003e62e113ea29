"""The web dashboard under /ui/: sign-in, pages, operator actions and their live events.

Pages are HTML written on the server (taskd.http.pages) from the replies of the control
service's own methods (taskd.service.Dispatch), so that the dashboard shows and does exactly
what taskctl does, with the same checks and errors. Actions are plain HTML forms (they work
without JavaScript); the vendored htmx and its SSE extension (taskd/http/ui/) refresh the
live parts of a page when the daemon's events say something changed.

A browser signs in once with a token (POST /ui/sign-in) and holds a session cookie
(taskd.http.sessions); every POST must carry the session's CSRF token, and one from a
read-only session is refused (403) whatever it asks. The cookie is valid only under /ui/:
the JSON API still wants a token in the Authorization header, so that a page of another
site cannot use a signed-in browser against it.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, NamedTuple

import msgspec

from taskd import protocol
from taskd.http import pages
from taskd.http.api import EVENT_STREAM, STATUS_FOR_CODE
from taskd.http.pages import RunForm, Viewer
from taskd.http.routes import EventStream, HttpError, HttpRequest, HttpResponse, instant
from taskd.http.sessions import Session, Sessions
from taskd.http.settings import Tokens, fingerprint
from taskd.live import LiveEvents
from taskd.models import ACTIVE_STATUSES, JOB_ORIGINS, JOB_STATUSES, JobStatus
from taskd.protocol import (
    BatchParams,
    CancelParams,
    EnqueueParams,
    ErrorCode,
    JobParams,
    JobsParams,
    ListTasksParams,
    LogsParams,
    PauseScheduleParams,
    PauseTaskParams,
    ResumeScheduleParams,
    ResumeTaskParams,
    RetryParams,
    RpcError,
    SchedulesParams,
    StatusParams,
    SubscribeParams,
    TriggerScheduleParams,
    WhyParams,
)
from taskd.service import Dispatch

logger = logging.getLogger(__name__)

HTML = "text/html; charset=utf-8"
COOKIE = "taskd_session"
PAGE_SIZE = 50
BULK_PAGE = 1000
BULK_MAX = 10_000  # jobs one "all matching" action changes at most
SIGN_IN_BODY = 4096  # bytes: the sign-in form, read before the browser has a session
CHART_WINDOW, CHART_BARS = 3600.0, 12
# While jobs change, an open Overview reads its counts again at most every this many
# seconds, and at least 20 times as long as the last read took (a big store's counts cost
# most of a second): 5% of a core at most per page left open on a busy queue.
OVERVIEW_EVERY, OVERVIEW_SHARE = 2.0, 20
RETRYABLE: tuple[JobStatus, ...] = ("failed", "cancelled")
SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
)
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
Finished = Callable[[float, int], Awaitable[list[tuple[int, int]]]]
Need = Literal["public", "session", "read", "write"]
PageHandler = Callable[["Dashboard", HttpRequest, "Visit"], Awaitable[HttpResponse]]


class Visit(NamedTuple):
    """One request to the dashboard: the path's parts, the session, the form's fields."""

    path: dict[str, str]
    session: Session | None
    form: dict[str, str]
    query: dict[str, str]

    @property
    def viewer(self) -> Viewer:
        assert self.session is not None
        return Viewer(self.session.access == "full", self.session.csrf)


class UiRoute(NamedTuple):
    method: Literal["GET", "POST"]
    pattern: re.Pattern[str]
    handler: str
    need: Need


def _route(method: Literal["GET", "POST"], path: str, handler: str, need: Need) -> UiRoute:
    return UiRoute(method, re.compile(path), handler, need)


_SEGMENT = r"(?P<name>[^/]+)"
UI_ROUTES = [
    _route("GET", r"/", "redirect_home", "public"),
    _route("GET", r"/ui", "redirect_home", "public"),
    _route("GET", r"/ui/sign-in", "sign_in_page", "public"),
    _route("POST", r"/ui/sign-in", "sign_in", "public"),
    _route("POST", r"/ui/sign-out", "sign_out", "session"),
    _route("GET", r"/ui/static/(?P<file>[a-z.]+)", "static", "public"),
    _route("GET", r"/ui/", "overview", "read"),
    _route("GET", r"/ui/tasks", "tasks", "read"),
    _route("POST", rf"/ui/tasks/{_SEGMENT}/(?P<action>pause|resume)", "task_flow", "write"),
    _route("POST", rf"/ui/tasks/{_SEGMENT}/run", "run_task", "write"),
    _route("GET", r"/ui/jobs", "jobs", "read"),
    _route("GET", r"/ui/jobs/confirm", "confirm", "write"),
    _route("POST", r"/ui/jobs/(?P<action>retry|cancel)", "bulk", "write"),
    _route("GET", r"/ui/jobs/(?P<id>[0-9]{1,18})", "job", "read"),
    _route("POST", r"/ui/jobs/(?P<id>[0-9]{1,18})/(?P<action>retry|cancel)", "job_action", "write"),
    _route("GET", r"/ui/schedules", "schedules", "read"),
    _route(
        "POST",
        rf"/ui/schedules/{_SEGMENT}/(?P<action>pause|resume|trigger)",
        "schedule_action",
        "write",
    ),
    _route("GET", r"/ui/events", "events", "read"),
]


def serves(path: str) -> bool:
    """Whether a path is the dashboard's (else the JSON API's)."""
    return path in ("/", "/ui") or path.startswith("/ui/")


class Dashboard:
    """Answers the requests under /ui/ (and a browser's `GET /`)."""

    def __init__(
        self,
        dispatch: Dispatch,
        live: LiveEvents | None,
        finished: Finished,
        sessions: Sessions,
        trusted_proxies: Sequence[str] = (),
    ) -> None:
        self._dispatch = dispatch
        self._live = live
        self._finished = finished
        self.sessions = sessions
        self._trusted = frozenset(trusted_proxies)
        self._overview_took = 0.0  # seconds the last Overview's reads took

    def reconfigure(self, idle: float, trusted_proxies: Sequence[str], tokens: Tokens) -> None:
        """After a reload; the sessions of tokens no longer accepted end."""
        if ended := self.sessions.reconfigure(idle, tokens.fingerprints()):
            logger.info("dashboard: signed out %d sessions whose token was removed", ended)
        self._trusted = frozenset(trusted_proxies)

    # -- what the listener asks before reading a request --------------------------------

    def public(self, method: str, target: str) -> bool:
        """Whether the request needs no session (the sign-in page, static files)."""
        found = _match(method, _path(target))
        return found is not None and found[0].need == "public"

    def signs_in(self, method: str, target: str) -> bool:
        """The sign-in form: the one body read from a connection without a credential."""
        return method == "POST" and _path(target) == "/ui/sign-in"

    def session_of(self, headers: Sequence[tuple[bytes, bytes]]) -> Session | None:
        return self.sessions.get(_cookie(headers))

    # -- answering -----------------------------------------------------------------------

    async def handle(self, request: HttpRequest, tokens: Tokens) -> HttpResponse:
        path = _path(request.target)
        found = _match(request.method, path)
        if found is None:
            allowed = any(route.pattern.fullmatch(path) for route in UI_ROUTES)
            status = 405 if allowed else 404
            return _page(status, pages.message_page("Not found", f"No page {path} here."))
        route, params = found
        session = self.session_of(request.headers)
        form = _form(request) if request.method == "POST" else {}
        if (refusal := self._refusal(route, request, session, form)) is not None:
            return refusal
        visit = Visit(params, session, form, _query(request.target))
        try:
            if route.handler == "sign_in":
                return await self.sign_in(request, tokens)
            handler: PageHandler = _PAGE_HANDLERS[route.handler]
            return await handler(self, request, visit)
        except RpcError as exc:
            return _failure(exc.code, exc.message)
        except HttpError as exc:
            return _failure(exc.code, exc.message)

    def _refusal(
        self, route: UiRoute, request: HttpRequest, session: Session | None, form: dict[str, str]
    ) -> HttpResponse | None:
        """The answer to a request that may not go on: no session, no CSRF token, read-only."""
        if route.need == "public":
            return None
        if session is None:
            if _header(request.headers, b"hx-request"):  # a live part: the whole page goes
                return _page(200, "", (("HX-Redirect", "/ui/sign-in"),))
            if request.method == "GET" and route.handler != "events":
                return _redirect("/ui/sign-in")
            message = "Your session has ended (signed out, or idle too long): sign in again."
            return _page(401, pages.message_page("Signed out", message))
        if request.method == "POST":
            given = form.get("csrf") or _header(request.headers, b"x-csrf-token")
            if not session.csrf_matches(given):
                logger.info(
                    "dashboard: refused %s from %s: no valid CSRF token",
                    route.handler,
                    request.client,
                )
                message = "This form is out of date or did not come from this dashboard."
                return _page(403, pages.message_page("Refused", message))
        if route.need == "write" and session.access != "full":
            logger.info("dashboard: refused %s from %s: read-only", route.handler, request.client)
            message = "You signed in with a read-only token: it may look, not change."
            return _page(403, pages.message_page("Permission denied", message))
        return None

    # -- sign-in -------------------------------------------------------------------------

    async def redirect_home(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        if (
            _path(request.target) == "/"
            and b"text/html" not in (_header(request.headers, b"accept") or "").encode()
        ):
            return HttpError(
                "not_found", "no such path: / (GET /openapi.json lists the routes)"
            ).response()
        return _redirect("/ui/")

    async def sign_in_page(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        if visit.session is None and self.session_of(request.headers) is None:
            return _page(200, pages.sign_in())
        return _redirect("/ui/")

    async def sign_in(self, request: HttpRequest, tokens: Tokens) -> HttpResponse:
        site = _header(request.headers, b"sec-fetch-site")
        if site not in (None, "same-origin", "none"):
            return _page(403, pages.message_page("Refused", "Sign in from this dashboard."))
        token = _form(request).get("token", "").strip()
        access = tokens.access(f"Bearer {token}".encode("latin-1", "replace")) if token else None
        if access is None:
            logger.info(
                "dashboard: sign-in from %s refused: not a token of this taskd", request.client
            )
            error = "That is not a token this taskd accepts."
            return _page(401, pages.sign_in(error))
        session = self.sessions.open(access, fingerprint(token), request.client)
        logger.info("dashboard: %s signed in (%s access)", request.client, access)
        secure = "; Secure" if self._secure(request) else ""
        cookie = f"{COOKIE}={session.id}; Path=/ui; HttpOnly; SameSite=Strict{secure}"
        return _redirect("/ui/", (("Set-Cookie", cookie),))

    async def sign_out(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        assert visit.session is not None
        self.sessions.close(visit.session.id)
        expired = f"{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"
        return _redirect("/ui/sign-in", (("Set-Cookie", expired),))

    def _secure(self, request: HttpRequest) -> bool:
        """Behind a trusted proxy that says the browser used HTTPS (the listener has no TLS)."""
        host = request.client.rsplit(":", 1)[0].strip("[]")
        forwarded = _header(request.headers, b"x-forwarded-proto")
        return host in self._trusted and (forwarded or "").lower() == "https"

    async def static(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        name = visit.path["file"]
        body = _static_files().get(name)
        if body is None:
            return _page(404, pages.message_page("Not found", f"No file {name} here."))
        content_type = STATIC_TYPES[name[name.rindex(".") :]]
        cache = ("Cache-Control", "public, max-age=86400")
        return HttpResponse(200, body, content_type, (*SECURITY_HEADERS, cache))

    # -- pages ---------------------------------------------------------------------------

    async def overview(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        started = time.monotonic()
        status = await self._dispatch.call(protocol.STATUS, StatusParams())
        finished = await self._finished(CHART_WINDOW, CHART_BARS)
        self._overview_took = time.monotonic() - started
        live = pages.overview_live(status, finished, CHART_WINDOW)
        if visit.query.get("part") == "live":
            return _page(200, live)
        # Read again while jobs change (throttle), and once more when they stop (delay).
        every = max(OVERVIEW_EVERY, OVERVIEW_SHARE * self._overview_took)
        body = (
            '<div id="live" hx-get="/ui/?part=live" hx-trigger="sse:changed '
            f'throttle:{every:.0f}s, sse:changed delay:2s, sse:subscribed">{live}</div>'
        )
        events = "/ui/events?logs=false"
        return _page(200, pages.layout("Overview", body, visit.viewer, "/ui/", live=events))

    async def tasks(
        self, request: HttpRequest, visit: Visit, failed_run: RunForm | None = None
    ) -> HttpResponse:
        tasks = await self._dispatch.call(protocol.LIST_TASKS, ListTasksParams())
        body = pages.tasks_page(tasks, visit.viewer, failed_run)
        status = 200 if failed_run is None else 422
        return _page(status, pages.layout("Tasks", body, visit.viewer, "/ui/tasks"))

    async def task_flow(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        name = visit.path["name"]
        if visit.path["action"] == "pause":
            await self._dispatch.call(protocol.PAUSE_TASK, PauseTaskParams(name))
        else:
            await self._dispatch.call(protocol.RESUME_TASK, ResumeTaskParams(name))
        return _back(visit, "/ui/tasks")

    async def run_task(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        name, text = visit.path["name"], visit.form.get("payload", "").strip() or "{}"
        try:
            payload = msgspec.msgpack.encode(msgspec.json.decode(text.encode()))
        except (msgspec.DecodeError, UnicodeError) as exc:
            return await self.tasks(request, visit, RunForm(name, text, f"Not JSON: {exc}"))
        try:
            params = EnqueueParams(task=name, payload=msgspec.Raw(payload))
            enqueued = await self._dispatch.call(protocol.ENQUEUE, params)
        except RpcError as exc:
            if exc.code not in (ErrorCode.PAYLOAD_INVALID, ErrorCode.INVALID_PARAMS):
                raise
            return await self.tasks(request, visit, RunForm(name, text, exc.message))
        return _redirect(f"/ui/jobs/{enqueued.job_id}")

    async def jobs(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        filters = {key: visit.query.get(key, "").strip() for key in pages.FILTERS}
        task_names = [
            t.name for t in await self._dispatch.call(protocol.LIST_TASKS, ListTasksParams())
        ]
        error, jobs = None, []
        try:
            params = _jobs_params(filters, visit.query.get("before"), PAGE_SIZE, None)
            jobs = await self._dispatch.call(protocol.JOBS, params)
        except (HttpError, RpcError) as exc:
            error = exc.message
        more = jobs[-1].id if len(jobs) == PAGE_SIZE else None
        body = pages.jobs_page(jobs, filters, task_names, visit.viewer, more, error)
        return _page(200, pages.layout("Jobs", body, visit.viewer, "/ui/jobs"))

    async def confirm(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        action = visit.query.get("action", "")
        if action not in ("retry", "cancel"):
            return _page(400, pages.message_page("Which action?", "Retry or cancel?"))
        filters = {key: visit.query.get(key, "").strip() for key in pages.FILTERS}
        ids = await self._matching(filters, action)
        body = pages.confirm_page(action, len(ids), len(ids) >= BULK_MAX, filters, visit.viewer)
        title = f"{action.capitalize()} matching jobs"
        return _page(200, pages.layout(title, body, visit.viewer, "/ui/jobs"))

    async def bulk(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        action = visit.path["action"]
        filters = {key: visit.form.get(key, "").strip() for key in pages.FILTERS}
        done = changed = 0
        for job_id in await self._matching(filters, action):
            try:
                await self._job_action(action, job_id)
                done += 1
            except RpcError as exc:
                if exc.code not in (ErrorCode.CONFLICT, ErrorCode.UNKNOWN_JOB):
                    raise
                changed += 1  # it ended, or was retried, since the page was shown
        logger.info(
            "dashboard: %s %d jobs matching %s for %s",
            action,
            done,
            {k: v for k, v in filters.items() if v},
            request.client,
        )
        verb = "Retried" if action == "retry" else "Cancelled"
        message = f"{verb} {done} jobs" + (
            f"; {changed} had changed meanwhile and were left" if changed else ""
        )
        body = (
            f'<p role="status">{pages._e(message)}.</p>'
            f'<p><a href="/ui/jobs?{pages._e(pages.query_string(filters))}">Back to the jobs</a>'
            "</p>"
        )
        return _page(200, pages.layout(verb, body, visit.viewer, "/ui/jobs"))

    async def _matching(self, filters: dict[str, str], action: str) -> list[int]:
        """The ids of the jobs an "all matching" action would change (BULK_MAX at most)."""
        eligible = RETRYABLE if action == "retry" else ACTIVE_STATUSES
        chosen = filters.get("status")
        statuses = [s for s in eligible if not chosen or s == chosen]
        if not statuses:
            return []
        ids: list[int] = []
        before: str | None = None
        while len(ids) < BULK_MAX:
            params = _jobs_params(filters, before, BULK_PAGE, statuses)
            page = await self._dispatch.call(protocol.JOBS, params)
            ids += [job.id for job in page][: BULK_MAX - len(ids)]
            if len(page) < BULK_PAGE:
                break
            before = str(page[-1].id)
        return ids

    async def _job_action(self, action: str, job_id: int) -> None:
        if action == "retry":
            await self._dispatch.call(protocol.RETRY, RetryParams(job_id))
        else:
            await self._dispatch.call(protocol.CANCEL, CancelParams(job_id))

    async def job(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        job_id = int(visit.path["id"])
        job = await self._dispatch.call(protocol.JOB, JobParams(job_id))
        logs = await self._dispatch.call(protocol.LOGS, LogsParams(job_id))
        live = pages.job_live(job, logs)
        if visit.query.get("part") == "live":
            return _page(200, live)
        why = await self._dispatch.call(protocol.WHY, WhyParams(job_id))
        batch = None
        if job.batch_id is not None:
            batch = await self._dispatch.call(protocol.BATCH, BatchParams(job.batch_id))
        body = pages.job_page(job, why, batch, visit.viewer, live)
        page = pages.layout(
            f"Job {job_id}", body, visit.viewer, "/ui/jobs", live=f"/ui/events?job={job_id}"
        )
        return _page(200, page)

    async def job_action(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        job_id = int(visit.path["id"])
        await self._job_action(visit.path["action"], job_id)
        return _back(visit, f"/ui/jobs/{job_id}")

    async def schedules(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        schedules = await self._dispatch.call(protocol.SCHEDULES, SchedulesParams())
        body = pages.schedules_page(schedules, visit.viewer)
        return _page(200, pages.layout("Schedules", body, visit.viewer, "/ui/schedules"))

    async def schedule_action(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        name, action = visit.path["name"], visit.path["action"]
        if action == "pause":
            await self._dispatch.call(protocol.PAUSE_SCHEDULE, PauseScheduleParams(name))
        elif action == "resume":
            await self._dispatch.call(protocol.RESUME_SCHEDULE, ResumeScheduleParams(name))
        else:
            await self._dispatch.call(protocol.TRIGGER_SCHEDULE, TriggerScheduleParams(name))
        return _back(visit, "/ui/schedules")

    async def events(self, request: HttpRequest, visit: Visit) -> HttpResponse:
        """The `GET /events` stream for a signed-in page (bounded by max_event_streams)."""
        if self._live is None:
            raise RpcError(ErrorCode.SHUTTING_DOWN, "taskd is not serving live events")
        try:
            params = msgspec.convert(visit.query, SubscribeParams, strict=False)
        except msgspec.ValidationError as exc:
            return _failure(ErrorCode.INVALID_PARAMS, f"invalid query: {exc}")
        headers = (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))
        stream = EventStream(self._live, params)
        return HttpResponse(200, b"", EVENT_STREAM, headers, stream=stream)


_PAGE_HANDLERS: dict[str, PageHandler] = {
    route.handler: getattr(Dashboard, route.handler)
    for route in UI_ROUTES
    if route.handler != "sign_in"
}


# -- requests and responses -------------------------------------------------------------


def _jobs_params(
    filters: dict[str, str], before: str | None, limit: int, statuses: list[JobStatus] | None
) -> JobsParams:
    """The `jobs` method's params from the page's filters; HttpError for a value it cannot
    take (a status or origin not in the lists, a time without an offset)."""
    fields: dict[str, Any] = {"limit": limit}
    if status := filters.get("status"):
        if status not in JOB_STATUSES:
            raise HttpError(ErrorCode.INVALID_PARAMS, f"no status {status!r}")
        fields["status"] = [status]
    if statuses is not None:
        fields["status"] = statuses
    if (origin := filters.get("origin")) and origin not in JOB_ORIGINS:
        raise HttpError(ErrorCode.INVALID_PARAMS, f"no origin {origin!r}")
    for name in ("task", "key", "origin", "text"):
        if value := filters.get(name):
            fields[name] = value
    for name in ("since", "until"):
        if value := filters.get(name):
            fields[name] = instant(value, name)
    if before:
        fields["before"] = before
    try:
        return msgspec.convert(fields, JobsParams, strict=False)
    except msgspec.ValidationError as exc:
        raise HttpError(ErrorCode.INVALID_PARAMS, f"invalid filter: {exc}") from None


def _match(method: str, path: str) -> tuple[UiRoute, dict[str, str]] | None:
    for route in UI_ROUTES:
        if route.method == method and (found := route.pattern.fullmatch(path)) is not None:
            return route, {k: urllib.parse.unquote(v) for k, v in found.groupdict().items()}
    return None


def _path(target: str) -> str:
    return urllib.parse.urlsplit(target).path


def _query(target: str) -> dict[str, str]:
    pairs = urllib.parse.parse_qsl(urllib.parse.urlsplit(target).query, keep_blank_values=True)
    return dict(pairs)


def _form(request: HttpRequest) -> dict[str, str]:
    try:
        text = request.body.decode()
    except UnicodeError:
        return {}
    return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    value = next((v for k, v in headers if k == name), None)
    return None if value is None else value.decode("latin-1")


def _cookie(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            key, _, cookie = part.strip().partition("=")
            if key == COOKIE and cookie:
                return cookie
    return None


def _page(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    cache = ("Cache-Control", "no-store")
    return HttpResponse(status, text.encode(), HTML, (*SECURITY_HEADERS, cache, *headers))


def _redirect(location: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return _page(303, "", (("Location", location), *headers))


def _back(visit: Visit, default: str) -> HttpResponse:
    """Back to the page the form was on (a path of the dashboard only)."""
    back = visit.form.get("back", "")
    safe = back.startswith("/ui/") and "\\" not in back and not back.startswith("//")
    return _redirect(back if safe else default)


def _failure(code: str, message: str) -> HttpResponse:
    status = STATUS_FOR_CODE.get(code, 500)
    return _page(status, pages.message_page("That did not work", message))


@functools.cache
def _static_files() -> dict[str, bytes]:
    """The files under taskd/http/ui/, shipped in the package (no CDN, no build step)."""
    folder = importlib.resources.files("taskd.http") / "ui"
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and entry.name[entry.name.rfind(".") :] in STATIC_TYPES
    }
