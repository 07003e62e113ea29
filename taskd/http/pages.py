"""The dashboard's pages as HTML: pure functions from the service's replies to text.

Everything is escaped here (`_e`); no page has an inline script or style, so that the
Content-Security-Policy can forbid them. Times are written in UTC inside `<time>` elements;
/ui/static/dashboard.js shows them in the browser's zone and names it. Standard library and
msgspec only.
"""

from __future__ import annotations

import datetime as dt
import html
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

import taskd
from taskd.models import (
    JOB_ORIGINS,
    JOB_STATUSES,
    BatchInfo,
    Job,
    JobLogs,
    ScheduleInfo,
    Status,
    TaskInfo,
)
from taskd.protocol import WhyResult

STATIC_VERSION = taskd.__version__  # in the static files' URLs, so that an upgrade reloads them
NAV = (
    ("/ui/", "Overview"),
    ("/ui/tasks", "Tasks"),
    ("/ui/jobs", "Jobs"),
    ("/ui/schedules", "Schedules"),
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_CURRENT = ' aria-current="page"'
_CONNECTION = ' · updates: <span class="connection" role="status">connecting…</span>'


class Viewer(NamedTuple):
    """Who looks at a page: whether they may act, and their session's CSRF token."""

    full: bool
    csrf: str


def _time(at: float | None) -> str:
    if at is None:
        return "—"
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    iso = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    return f'<time datetime="{iso}">{moment:%Y-%m-%d %H:%M:%S} UTC</time>'


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _json(value: Any) -> str:
    """A payload or result as indented JSON (msgpack bytes decoded first)."""
    try:
        if isinstance(value, msgspec.Raw | bytes):
            value = msgspec.msgpack.decode(value)
        return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
    except (TypeError, ValueError, msgspec.DecodeError):
        return repr(value)


def _form(
    action: str,
    label: str,
    viewer: Viewer,
    back: str,
    *,
    hidden: Mapping[str, str] = {},
    kind: str = "",
) -> str:
    """A button that POSTs to `action` with the CSRF token (shown to full access only)."""
    if not viewer.full:
        return ""
    fields = {"csrf": viewer.csrf, "back": back, **hidden}
    inputs = "".join(
        f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">' for k, v in fields.items()
    )
    css = f' class="{kind}"' if kind else ""
    return (
        f'<form method="post" action="{_e(action)}" class="inline">{inputs}'
        f'<button type="submit"{css}>{_e(label)}</button></form>'
    )


def layout(title: str, body: str, viewer: Viewer, current: str, *, live: str = "") -> str:
    """A whole page: the navigation, the sign-out button, and `body` in <main>."""
    items = "".join(
        f'<li><a href="{href}"{_CURRENT if href == current else ""}>{name}</a></li>'
        for href, name in NAV
    )
    access = "full access" if viewer.full else "read-only"
    headers = msgspec.json.encode({"X-CSRF-Token": viewer.csrf}).decode()
    sse = f' hx-ext="sse" sse-connect="{_e(live)}"' if live else ""
    sign_out = (
        '<form method="post" action="/ui/sign-out" class="inline">'
        f'<input type="hidden" name="csrf" value="{_e(viewer.csrf)}">'
        '<button type="submit">Sign out</button></form>'
    )
    return _document(
        title,
        f"<body hx-headers='{_e(headers)}'>"
        '<a class="skip" href="#main">Skip to content</a>'
        f'<header><nav aria-label="Main"><ul>{items}</ul></nav>'
        f'<div class="who">{access} {sign_out}</div></header>'
        f'<main id="main"{sse}><h1>{_e(title)}</h1>{body}</main>'
        f"<footer>taskd {_e(taskd.__version__)} · times in "
        '<span class="zone">UTC</span>'
        f"{_CONNECTION if live else ''}"
        "</footer></body>",
    )


def _document(title: str, body: str) -> str:
    v = _e(STATIC_VERSION)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="htmx-config" content=\'{"includeIndicatorStyles":false,'
        '"allowEval":false,"allowScriptTags":false}\'>'
        f"<title>{_e(title)} · taskd</title>"
        f'<link rel="stylesheet" href="/ui/static/dashboard.css?v={v}">'
        f'<script src="/ui/static/htmx.min.js?v={v}" defer></script>'
        f'<script src="/ui/static/sse.min.js?v={v}" defer></script>'
        f'<script src="/ui/static/dashboard.js?v={v}" defer></script>'
        f"</head>{body}</html>"
    )


def sign_in(error: str | None = None) -> str:
    alert = f'<p role="alert" class="error">{_e(error)}</p>' if error else ""
    return _document(
        "Sign in",
        '<body><main id="main" class="narrow"><h1>taskd</h1>'
        f'{alert}<form method="post" action="/ui/sign-in">'
        '<label for="token">Token</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" '
        "required autofocus>"
        '<button type="submit">Sign in</button></form>'
        "<p>A token from the <code>[http]</code> table of taskd.toml: a read-only one shows "
        "everything and changes nothing.</p></main></body>",
    )


# -- Overview ----------------------------------------------------------------------------


def overview_live(status: Status, finished: Sequence[tuple[int, int]], window: float) -> str:
    counts = "".join(
        f"<div><dt>{name}</dt><dd>{status.counts.get(name, 0)}</dd></div>" for name in JOB_STATUSES
    )
    store = (
        '<p class="error" role="alert">Writes to the job store fail since '
        f"{_time(status.store_failing.since)}: {_e(status.store_failing.error)}</p>"
        if status.store_failing
        else "<p>Job store: <strong>healthy</strong> (writes go through).</p>"
    )
    threads = status.threads
    stuck = (
        f"<p>Threads: {threads.running} running, <strong>{threads.stuck} stuck</strong></p>"
        if threads is not None
        else ""
    )
    rows = "".join(
        f'<tr><th scope="row"><a href="/ui/jobs?task={_q(t.task)}">{_e(t.task)}</a></th>'
        f"<td>{t.counts.get('pending', 0)}</td><td>{t.counts.get('running', 0)}</td>"
        f"<td>{t.counts.get('failed', 0)}</td><td>{_age(t.oldest_pending_age)}</td>"
        f"<td>{'paused' if t.task in status.paused_tasks else ''}</td></tr>"
        for t in status.tasks
    )
    nodes = "".join(
        f'<tr><th scope="row">{_e(n.id)}</th><td>{_e(n.host)}</td><td>{n.pid}</td>'
        f"<td>{n.running}</td><td>{_time(n.seen_at)}</td></tr>"
        for n in status.nodes
    )
    return (
        f'<section aria-labelledby="counts"><h2 id="counts">Jobs by status</h2>'
        f'<dl class="counts">{counts}</dl></section>'
        f'<section aria-labelledby="chart"><h2 id="chart">Last hour</h2>'
        f"{throughput_chart(finished, window)}</section>"
        f'<section aria-labelledby="health"><h2 id="health">Health</h2>{store}{stuck}'
        f"<p>Oldest due pending job: {_age(status.oldest_pending_age)}</p></section>"
        '<section aria-labelledby="queues"><h2 id="queues">Queues</h2>'
        '<div class="scroll"><table><thead><tr><th scope="col">Task</th>'
        '<th scope="col">Pending</th><th scope="col">Running</th><th scope="col">Failed</th>'
        '<th scope="col">Oldest pending</th><th scope="col">Flow</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></div></section>"
        '<section aria-labelledby="nodes"><h2 id="nodes">Nodes</h2>'
        '<div class="scroll"><table><thead><tr><th scope="col">Node</th><th scope="col">Host'
        '</th><th scope="col">PID</th><th scope="col">Running</th><th scope="col">Seen</th>'
        f"</tr></thead><tbody>{nodes}</tbody></table></div></section>"
    )


def throughput_chart(finished: Sequence[tuple[int, int]], window: float) -> str:
    """Bars of succeeded (and, stacked on them, failed) jobs per span, as SVG."""
    width, height, gap = 300, 80, 2
    top = max((s + f for s, f in finished), default=0) or 1
    bar = width / max(1, len(finished))
    minutes = window / 60 / max(1, len(finished))
    bars = []
    for index, (succeeded, failed) in enumerate(finished):
        x = index * bar + gap / 2
        ok_height = height * succeeded / top
        bad_height = height * failed / top
        ago = (len(finished) - index) * minutes
        label = f"{ago:.0f} to {ago - minutes:.0f} min ago: {succeeded} succeeded, {failed} failed"
        bars.append(
            f'<g><title>{label}</title><rect class="ok" x="{x:.1f}" '
            f'y="{height - ok_height:.1f}" width="{bar - gap:.1f}" height="{ok_height:.1f}"/>'
            f'<rect class="bad" x="{x:.1f}" y="{height - ok_height - bad_height:.1f}" '
            f'width="{bar - gap:.1f}" height="{bad_height:.1f}"/></g>'
        )
    total_ok = sum(s for s, _ in finished)
    total_bad = sum(f for _, f in finished)
    summary = f"{total_ok} jobs succeeded and {total_bad} failed in the last hour"
    return (
        f'<figure><svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{summary}">{"".join(bars)}</svg><figcaption>{summary}; '
        f'<span class="ok">■</span> succeeded, <span class="bad">■</span> failed, per '
        f"{minutes:.0f} minutes (highest: {top})</figcaption></figure>"
    )


# -- Tasks -------------------------------------------------------------------------------


class RunForm(NamedTuple):
    """A Run form sent back with the server's error: the task, the text, the error."""

    task: str
    payload: str
    error: str


def tasks_page(tasks: Iterable[TaskInfo], viewer: Viewer, failed_run: RunForm | None) -> str:
    return "".join(_task(task, viewer, failed_run) for task in tasks) or "<p>No tasks.</p>"


def _task(task: TaskInfo, viewer: Viewer, failed_run: RunForm | None) -> str:
    name = _e(task.name)
    anchor = f"task-{_q(task.name)}"
    limits = [
        f"{label}: {_e(value)}"
        for label, value in (
            ("timeout", f"{task.timeout:g} s" if task.timeout else None),
            ("attempts", task.max_attempts),
            ("concurrency", task.concurrency),
            ("rate limit", task.rate_limit),
        )
        if value is not None
    ]
    schedules = ", ".join(f"<code>{_e(cron)}</code>" for cron in task.schedules) or "none"
    paused = (
        f"<p><strong>Paused</strong> since {_time(task.paused_since)}</p>"
        if task.paused_since is not None
        else ""
    )
    back = f"/ui/tasks#{anchor}"
    toggle = (
        _form(f"/ui/tasks/{_q(task.name)}/resume", "Resume", viewer, back)
        if task.paused_since is not None
        else _form(f"/ui/tasks/{_q(task.name)}/pause", "Pause", viewer, back)
    )
    return (
        f'<article id="{_e(anchor)}" aria-labelledby="{_e(anchor)}-name">'
        f'<h2 id="{_e(anchor)}-name">{name}</h2><p>{_e(task.description)}</p>{paused}'
        f"<dl><div><dt>Schedules</dt><dd>{schedules}; next run {_time(task.next_run_at)}"
        f"</dd></div><div><dt>Limits</dt><dd>{'; '.join(limits) or 'none'}</dd></div></dl>"
        f'<div class="actions">{toggle} <a href="/ui/jobs?task={_q(task.name)}">Jobs</a></div>'
        f"{_run_form(task, viewer, failed_run)}</article>"
    )


def _run_form(task: TaskInfo, viewer: Viewer, failed_run: RunForm | None) -> str:
    if not viewer.full:
        return ""
    mine = failed_run if failed_run is not None and failed_run.task == task.name else None
    field = f"payload-{_q(task.name)}"
    error = (
        f'<p role="alert" class="error" id="{_e(field)}-error">{_e(mine.error)}</p>' if mine else ""
    )
    described = f' aria-describedby="{_e(field)}-error"' if mine else ""
    schema = (
        f"<details><summary>Payload schema</summary><pre>{_e(_json(task.payload_schema))}"
        "</pre></details>"
        if task.payload_schema
        else "<p>This task takes any payload.</p>"
    )
    return (
        f"<details{' open' if mine else ''}><summary>Run…</summary>"
        f'<form method="post" action="/ui/tasks/{_q(task.name)}/run">'
        f'<input type="hidden" name="csrf" value="{_e(viewer.csrf)}">'
        f'<label for="{_e(field)}">Payload (JSON)</label>{error}'
        f'<textarea id="{_e(field)}" name="payload" rows="4" spellcheck="false"{described}>'
        f"{_e(mine.payload if mine else '{}')}</textarea>{schema}"
        '<button type="submit">Run</button></form></details>'
    )


# -- Jobs --------------------------------------------------------------------------------

FILTERS = ("task", "status", "key", "origin", "since", "until", "text")


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def query_string(filters: Mapping[str, str], **more: str) -> str:
    fields = {k: v for k, v in {**filters, **more}.items() if v}
    return urllib.parse.urlencode(fields)


def jobs_page(
    jobs: Sequence[Job],
    filters: Mapping[str, str],
    task_names: Sequence[str],
    viewer: Viewer,
    next_before: int | None,
    error: str | None,
) -> str:
    alert = f'<p role="alert" class="error">{_e(error)}</p>' if error else ""
    here = "/ui/jobs" + (f"?{query_string(filters)}" if query_string(filters) else "")
    rows = "".join(_job_row(job, viewer, here) for job in jobs)
    more = (
        f'<p><a rel="next" href="/ui/jobs?{_e(query_string(filters, before=str(next_before)))}">'
        "Older jobs</a></p>"
        if next_before is not None
        else ""
    )
    bulk = ""
    if viewer.full:
        bulk = (
            '<div class="actions">'
            f'<a href="/ui/jobs/confirm?{_e(query_string(filters, action="retry"))}">'
            "Retry all matching…</a> "
            f'<a href="/ui/jobs/confirm?{_e(query_string(filters, action="cancel"))}">'
            "Cancel all matching…</a></div>"
        )
    return (
        f"{_filter_form(filters, task_names)}{alert}{bulk}"
        '<div class="scroll"><table id="jobs"><caption>Newest first</caption><thead><tr>'
        '<th scope="col">Job</th><th scope="col">Task</th><th scope="col">Status</th>'
        '<th scope="col">Origin</th><th scope="col">Key</th><th scope="col">Created</th>'
        '<th scope="col">Attempts</th><th scope="col">Error</th>'
        f'<th scope="col"><span class="visually-hidden">Actions</span></th></tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
        f"{'' if jobs else '<p>No jobs match.</p>'}{more}"
    )


def _select(name: str, label: str, options: Sequence[str], chosen: str) -> str:
    items = "".join(
        f'<option value="{_e(o)}"{" selected" if o == chosen else ""}>{_e(o or "any")}</option>'
        for o in ("", *options)
    )
    return (
        f'<div><label for="f-{name}">{label}</label>'
        f'<select id="f-{name}" name="{name}">{items}</select></div>'
    )


def _text(name: str, label: str, value: str, hint: str = "") -> str:
    placeholder = f' placeholder="{_e(hint)}"' if hint else ""
    return (
        f'<div><label for="f-{name}">{label}</label>'
        f'<input id="f-{name}" name="{name}" value="{_e(value)}"{placeholder}></div>'
    )


def _with(names: Sequence[str], chosen: str) -> Sequence[str]:
    """The tasks to choose from, and the one chosen (a task no longer loaded has jobs still)."""
    return names if not chosen or chosen in names else [*names, chosen]


def _filter_form(filters: Mapping[str, str], task_names: Sequence[str]) -> str:
    when, task = "2026-12-01T08:00+01:00", filters.get("task", "")
    return (
        '<form method="get" action="/ui/jobs" class="filters" role="search">'
        f"{_select('task', 'Task', _with(task_names, task), task)}"
        f"{_select('status', 'Status', JOB_STATUSES, filters.get('status', ''))}"
        f"{_select('origin', 'Origin', JOB_ORIGINS, filters.get('origin', ''))}"
        f"{_text('key', 'Key', filters.get('key', ''))}"
        f"{_text('since', 'Created since', filters.get('since', ''), when)}"
        f"{_text('until', 'Created before', filters.get('until', ''), when)}"
        f"{_text('text', 'Payload contains', filters.get('text', ''))}"
        '<div><button type="submit">Filter</button> <a href="/ui/jobs">Clear</a></div></form>'
    )


def _job_row(job: Job, viewer: Viewer, back: str) -> str:
    actions = ""
    if job.status in ("failed", "cancelled"):
        actions = _form(f"/ui/jobs/{job.id}/retry", "Retry", viewer, back)
    elif job.status in ("pending", "running"):
        actions = _form(f"/ui/jobs/{job.id}/cancel", "Cancel", viewer, back)
    return (
        f'<tr data-status="{job.status}"><th scope="row"><a href="/ui/jobs/{job.id}">'
        f"{job.id}</a></th><td>{_e(job.task)}</td>"
        f'<td><span class="status {job.status}">{job.status}</span></td><td>{job.origin}</td>'
        f"<td>{_e(job.key or '')}</td><td>{_time(job.created_at)}</td>"
        f"<td>{job.attempts}/{job.max_attempts}</td>"
        f'<td class="error-text">{_e((job.error or "")[:120])}</td><td>{actions}</td></tr>'
    )


def confirm_page(
    action: str, count: int, capped: bool, filters: Mapping[str, str], viewer: Viewer
) -> str:
    verb = action.capitalize()
    described = ", ".join(f"{k} = {v}" for k, v in filters.items() if v) or "every job"
    which = "failed or cancelled" if action == "retry" else "pending or running"
    at_most = " (at most this many are done at once)" if capped else ""
    hidden = "".join(
        f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">' for k, v in filters.items() if v
    )
    back = f"/ui/jobs?{query_string(filters)}"
    if count == 0:
        return f'<p>No {which} job matches {_e(described)}.</p><p><a href="{_e(back)}">Back</a></p>'
    return (
        f"<p>{verb} <strong>{count}</strong> {which} jobs matching {_e(described)}"
        f"{at_most}?</p>"
        f'<form method="post" action="/ui/jobs/{action}">'
        f'<input type="hidden" name="csrf" value="{_e(viewer.csrf)}">{hidden}'
        f'<input type="hidden" name="expected" value="{count}">'
        f'<button type="submit">{verb} {count} jobs</button> '
        f'<a href="{_e(back)}">Back</a></form>'
    )


# -- Job ---------------------------------------------------------------------------------


def job_page(job: Job, why: WhyResult, batch: BatchInfo | None, viewer: Viewer, live: str) -> str:
    here = f"/ui/jobs/{job.id}"
    action = ""
    if job.status in ("failed", "cancelled"):
        action = _form(f"{here}/retry", "Retry", viewer, here)
    elif job.status in ("pending", "running"):
        action = _form(f"{here}/cancel", "Cancel", viewer, here)
    links = [
        *(f'parent <a href="/ui/jobs/{p}">{p}</a>' for p in job.parents),
        *(f'child <a href="/ui/jobs/{c}">{c}</a>' for c in job.children),
    ]
    if job.parent_id is not None:
        links.append(f'started by <a href="/ui/jobs/{job.parent_id}">{job.parent_id}</a>')
    if batch is not None:
        links.append(
            f"batch {batch.id}: {batch.ended} of {batch.total} ended"
            + (
                f', callback <a href="/ui/jobs/{batch.callback_id}">{batch.callback_id}</a>'
                if batch.callback_id
                else ""
            )
        )
    attempts = "".join(
        f"<li><p>Attempt {err.attempt} ({_e(err.kind)}) {_time(err.at)}"
        f"{f' on {_e(err.worker)}' if err.worker else ''}: {_e(err.message)}</p>"
        + (
            f"<details><summary>Traceback</summary><pre>{_e(err.traceback)}</pre></details>"
            if err.traceback
            else ""
        )
        + "</li>"
        for err in job.errors
    )
    timeline = "".join(
        f"<li>{_time(event.at)} {_e(event.event)}"
        f"{f' (attempt {event.attempt})' if event.attempt else ''}"
        f"{f': {_e(event.message)}' if event.message else ''}</li>"
        for event in why.timeline
    )
    return (
        f'<div class="actions">{action}</div>'
        # Read again when its state changes, and after each (re)connection: a resync.
        f'<div id="live" data-job="{job.id}" hx-get="{_e(here)}?part=live" '
        f'hx-trigger="sse:state, sse:subscribed">{live}</div>'
        # Its progress and lines as they come, for dashboard.js (no request).
        '<div hidden class="job-events" hx-trigger="sse:progress, sse:log"></div>'
        f"<dl><div><dt>Task</dt><dd>{_e(job.task)}</dd></div>"
        f"<div><dt>Origin</dt><dd>{job.origin}</dd></div>"
        f"<div><dt>Key</dt><dd>{_e(job.key or '—')}</dd></div>"
        f"<div><dt>Created</dt><dd>{_time(job.created_at)}</dd></div>"
        f"<div><dt>Run at</dt><dd>{_time(job.run_at)}</dd></div>"
        f"<div><dt>Priority</dt><dd>{job.priority}</dd></div>"
        f"<div><dt>Links</dt><dd>{'; '.join(links) or 'none'}</dd></div></dl>"
        f"<h2>Payload</h2><pre>{_e(_json(job.payload))}</pre>"
        f"<h2>Result</h2><pre>{_e(_json(job.result))}</pre>"
        f"<h2>Attempts</h2>{f'<ol>{attempts}</ol>' if attempts else '<p>No failed attempt.</p>'}"
        f'<h2>Why</h2><p>{_e(why.message)}</p><ol class="timeline">{timeline}</ol>'
    )


def job_live(job: Job, logs: JobLogs) -> str:
    """The part of a job's page its `state` events refresh: status, progress, log lines.

    Its `progress` and `log` events are shown as they come by /ui/static/dashboard.js (a read
    could miss what the daemon has not written yet); `data-line` keeps a line from showing
    twice."""
    progress = job.progress
    value, text, hidden = "", "", " hidden"
    if progress is not None:
        total = progress.total
        value = f' value="{progress.done:g}" max="{total:g}"' if total else ""
        text = f"{progress.done:g}" + (f" of {total:g}" if total else "")
        text += f" — {progress.message}" if progress.message else ""
        hidden = ""
    lines = "".join(
        f'<li data-line="{line.epoch}.{line.seq}">{_time(line.at)} '
        f'<span class="level">{_e(line.level)}</span> {_e(line.message)}</li>'
        for line in logs.lines[-200:]
    )
    dropped = f"<p>{logs.dropped} older lines were let go.</p>" if logs.dropped else ""
    return (
        f'<p>Status: <span class="status {job.status}" id="job-status">{job.status}</span>; '
        f"attempts {job.attempts}/{job.max_attempts}"
        f"{f'; on {_e(job.worker)}' if job.worker else ''}</p>"
        f'<p id="job-progress"{hidden}><label for="progress">Progress</label> '
        f'<progress id="progress"{value}></progress> <span id="progress-text">{_e(text)}</span>'
        f'</p><h2>Log</h2>{dropped}<ol class="log" aria-live="polite">{lines}</ol>'
    )


# -- Schedules ---------------------------------------------------------------------------


def schedules_page(schedules: Sequence[ScheduleInfo], viewer: Viewer) -> str:
    rows = []
    for s in schedules:
        key = _q(s.id)
        toggle = (
            _form(f"/ui/schedules/{key}/resume", "Resume", viewer, "/ui/schedules")
            if s.paused
            else _form(f"/ui/schedules/{key}/pause", "Pause", viewer, "/ui/schedules")
        )
        trigger = _form(f"/ui/schedules/{key}/trigger", "Trigger", viewer, "/ui/schedules")
        fired = ", ".join(f'<a href="/ui/jobs/{j.id}">{_e(j.task)} {j.id}</a>' for j in s.last_jobs)
        rows.append(
            f'<tr id="schedule-{_e(s.id)}"><th scope="row">{_e(s.id)}</th>'
            f"<td><code>{_e(s.cron)}</code></td><td>{_e(s.timezone)}</td>"
            f"<td>{_e(', '.join(s.tasks))}</td>"
            f"<td>{'paused' if s.paused else 'active'}</td><td>{_time(s.next_tick)}</td>"
            f"<td>{_time(s.last_tick)}</td><td>{_e(s.last_outcome or '—')} {fired}</td>"
            f"<td>{s.coalesced}</td><td>{toggle} {trigger}</td></tr>"
        )
    return (
        '<div class="scroll"><table><thead><tr><th scope="col">Schedule</th>'
        '<th scope="col">Expression</th><th scope="col">Zone</th><th scope="col">Tasks</th>'
        '<th scope="col">State</th><th scope="col">Next tick</th><th scope="col">Last tick</th>'
        '<th scope="col">Last outcome</th><th scope="col">Coalesced</th>'
        '<th scope="col"><span class="visually-hidden">Actions</span></th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
        f"{'' if rows else '<p>No schedules.</p>'}"
    )


def message_page(title: str, message: str) -> str:
    return _document(
        title,
        f'<body><main id="main" class="narrow"><h1>{_e(title)}</h1>'
        f'<p>{_e(message)}</p><p><a href="/ui/">Back to the dashboard</a></p></main></body>',
    )
