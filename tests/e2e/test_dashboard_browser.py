"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by playwright).

One taskd and one browser for the module; each test opens its own browser context (its own
cookies). Every request a page makes is recorded, and the last test checks that none left
127.0.0.1. Without chromium the module is skipped, unless CI is set: then it fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backends import BACKENDS, drop_schema, postgres_url, unique_schema
from tests.http_support import READONLY_TOKEN, TOKEN, HttpClient, http_config, http_port
from tests.support import Taskd, short_tempdir, wait_until

CHROMIUM = "/usr/bin/chromium"
if not os.environ.get("CI"):  # in CI (.ci/run installs chromium) they run or fail
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"{CHROMIUM} is not installed (apt-get install chromium); CI=1 runs these tests",
            allow_module_level=True,
        )
    pytest.importorskip("playwright.sync_api", reason="the `test` extra installs playwright")
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright  # noqa: E402

SCHEDULES = """
[[schedule]]
id = "nightly"
cron = "30 2 * * *"
tasks = ["echo"]
"""
REQUESTS: list[str] = []  # every URL any page of this module asked for
CONSOLE_ERRORS: list[str] = []  # a script that failed, or the CSP refusing something


@pytest.fixture(scope="module", params=BACKENDS)
def daemon(request: pytest.FixtureRequest) -> Iterator[Taskd]:
    """A taskd on each job store in turn (PostgreSQL: a schema of its own)."""
    root = short_tempdir()
    config, schema = SCHEDULES + http_config(), None
    if request.param == "postgres":
        url, schema = postgres_url(), unique_schema()
        config = f'[postgres]\nschema = "{schema}"\n' + config
    taskd = Taskd(root, config=config, log_level="info")
    if schema is not None:
        taskd.database = url  # type: ignore[assignment]
    yield taskd.start()
    if taskd.running:
        taskd.stop()
    taskd.close()
    shutil.rmtree(root, ignore_errors=True)
    if schema is not None:  # in a thread: playwright's event loop runs in this one
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, drop_schema(url, schema)).result()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context()
    CONSOLE_ERRORS.clear()  # each test answers for its own page's errors
    context.on("request", lambda request: REQUESTS.append(request.url))
    context.on("console", lambda message: record_console(message.type, message.text))
    context.on("weberror", lambda error: CONSOLE_ERRORS.append(str(error.error)))
    context.set_default_timeout(10_000)
    yield context
    context.close()
    assert_local(REQUESTS)
    assert CONSOLE_ERRORS == []


def record_console(kind: str, text: str) -> None:
    # A refused request (403, 422) is logged by the browser too: what the test meant.
    if kind == "error" and "Failed to load resource" not in text:
        CONSOLE_ERRORS.append(text)


def assert_local(urls: list[str]) -> None:
    hosts = {urllib.parse.urlsplit(url).hostname for url in urls}
    assert hosts <= {"127.0.0.1"}, sorted(hosts)


def base(daemon: Taskd) -> str:
    return f"http://127.0.0.1:{http_port(daemon)}"


def signed_in(context: BrowserContext, daemon: Taskd, token: str = TOKEN) -> Page:
    page = context.new_page()
    page.goto(base(daemon) + "/ui/")
    expect(page).to_have_url(re.compile(r"/ui/sign-in$"))
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
    return page


def api(daemon: Taskd) -> HttpClient:
    return HttpClient.of(daemon)


def job_of(daemon: Taskd, job_id: int) -> dict[str, Any]:
    reply = api(daemon).get(f"/jobs/{job_id}")
    assert reply.status == 200, reply
    job: dict[str, Any] = reply.json()
    return job


def failed_job(daemon: Taskd, why: str) -> int:
    """A job of `fail`, enqueued (no key: runs of a task share one) and failed."""
    reply = api(daemon).post("/jobs", {"task": "fail", "payload": {"why": why}, "max_attempts": 1})
    job_id = int(reply.json()["job_id"])
    wait_until(lambda: job_of(daemon, job_id)["status"] == "failed", what=f"job {job_id} to fail")
    return job_id


def test_sign_in_with_a_full_token_and_sign_out(context: BrowserContext, daemon: Taskd) -> None:
    page = signed_in(context, daemon)
    expect(page.get_by_text("full access")).to_be_visible()
    expect(page.get_by_role("heading", name="Jobs by status")).to_be_visible()
    cookies = context.cookies()
    assert [c["httpOnly"] for c in cookies] == [True] and cookies[0]["sameSite"] == "Strict"
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/ui/sign-in$"))
    page.goto(base(daemon) + "/ui/jobs")
    expect(page).to_have_url(re.compile(r"/ui/sign-in$"))  # the session has ended
    assert TOKEN not in " ".join(REQUESTS)


def test_a_read_only_token_sees_no_action_and_a_forged_one_gets_403(
    context: BrowserContext, daemon: Taskd
) -> None:
    failed_job(daemon, "read-only view")
    page = signed_in(context, daemon, READONLY_TOKEN)
    expect(page.get_by_text("read-only")).to_be_visible()
    for path in ("/ui/tasks", "/ui/jobs", "/ui/schedules", f"/ui/jobs/{failed_job(daemon, 'x')}"):
        page.goto(base(daemon) + path)
        buttons = page.locator("main").get_by_role("button")
        names = [name.strip() for name in buttons.all_inner_texts()]
        assert set(names) <= {"Filter"}, (path, names)
    # What the page would send if it had the button, with its own session's CSRF token.
    csrf = page.locator('input[name="csrf"]').first.get_attribute("value")
    assert csrf
    forged = page.request.post(
        base(daemon) + "/ui/tasks/echo/pause", form={"csrf": csrf, "back": "/ui/tasks"}
    )
    assert forged.status == 403
    assert "echo" not in json.loads(daemon.ctl("status", "--json").stdout)["paused_tasks"]


def test_a_state_changing_request_without_the_csrf_token_is_refused(
    context: BrowserContext, daemon: Taskd
) -> None:
    page = signed_in(context, daemon)
    refused = page.request.post(base(daemon) + "/ui/tasks/echo/pause", form={"back": "/ui/"})
    assert refused.status == 403
    assert "echo" not in json.loads(daemon.ctl("status", "--json").stdout)["paused_tasks"]


def test_filtering_jobs_and_retrying_one_and_all_failed_jobs_of_a_task(
    context: BrowserContext, daemon: Taskd
) -> None:
    first, second = failed_job(daemon, "first"), failed_job(daemon, "second")
    api(daemon).post("/tasks/echo", {"payload": {"needle": "haystack"}})
    page = signed_in(context, daemon)
    page.get_by_role("link", name="Jobs", exact=True).click()
    page.get_by_label("Task").select_option("fail")
    page.get_by_label("Status").select_option("failed")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"task=fail&status=failed"))
    rows = page.locator("#jobs tbody tr")
    assert rows.count() >= 2
    assert set(page.locator("#jobs tbody tr td:nth-child(2)").all_inner_texts()) == {"fail"}
    page.get_by_label("Payload contains").fill("haystack")
    page.get_by_label("Task").select_option("")
    page.get_by_label("Status").select_option("")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(1)
    # Retry one: the button in its row.
    page.goto(base(daemon) + "/ui/jobs?task=fail&status=failed")
    page.locator(f'#jobs tr:has(a[href="/ui/jobs/{first}"])').get_by_role(
        "button", name="Retry"
    ).click()
    wait_until(lambda: any(e["kind"] == "retried" for e in job_of(daemon, first)["errors"]))
    wait_until(lambda: job_of(daemon, first)["status"] == "failed", what="the retry to fail")
    # Retry all: the confirmation says how many.
    failed = len(api(daemon).get("/jobs?task=fail&status=failed&limit=1000").json()["jobs"])
    page.goto(base(daemon) + "/ui/jobs?task=fail&status=failed")
    page.get_by_role("link", name="Retry all matching…").click()
    expect(page.locator("main")).to_contain_text(f"Retry {failed} failed or cancelled jobs")
    page.get_by_role("button", name=f"Retry {failed} jobs").click()
    expect(page.get_by_role("status")).to_contain_text(f"Retried {failed} jobs")
    retried = [e["kind"] for e in job_of(daemon, second)["errors"]].count("retried")
    assert retried == 1


def test_a_running_jobs_progress_and_log_lines_appear_live(
    context: BrowserContext, daemon: Taskd
) -> None:
    gate_path = daemon.root / "gate"
    os.mkfifo(gate_path)
    payload = {"steps": 3, "gate": str(gate_path)}
    job_id = int(api(daemon).post("/jobs", {"task": "steps", "payload": payload}).json()["job_id"])
    page = signed_in(context, daemon)
    with open(gate_path, "w") as gate:  # opens once the task has opened its end
        page.goto(base(daemon) + f"/ui/jobs/{job_id}")
        expect(page.locator("#job-status")).to_have_text("running")
        expect(page.locator("footer .connection")).to_have_text("live")  # its events come
        page.evaluate("window.notReloaded = true")
        for step in (1, 2):
            gate.write("\n")
            gate.flush()
            expect(page.locator("ol.log")).to_contain_text(f"step {step} of 3")
            expect(page.locator("#live")).to_contain_text(f"{step} of 3")
        gate.write("\n")
    expect(page.locator("#job-status")).to_have_text("succeeded")
    assert page.evaluate("window.notReloaded") is True  # no reload, no navigation


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ss") is None,
    reason="cutting taskd's connections takes root and `ss -K` (iproute2); CI runs as root",
)
def test_a_lost_connection_reconnects_and_resyncs(context: BrowserContext, daemon: Taskd) -> None:
    gate_path = daemon.root / "gate-resync"
    os.mkfifo(gate_path)
    payload = {"steps": 2, "gate": str(gate_path)}
    job_id = int(api(daemon).post("/jobs", {"task": "steps", "payload": payload}).json()["job_id"])
    page = signed_in(context, daemon)
    with open(gate_path, "w") as gate:
        page.goto(base(daemon) + f"/ui/jobs/{job_id}")
        expect(page.locator("footer .connection")).to_have_text("live")
        context.route("**/ui/events*", lambda route: route.abort())  # no way back, for now
        cut = subprocess.run(  # taskd's end of every connection to it: the stream's too
            ["ss", "-K", f"sport = :{http_port(daemon)}"], capture_output=True, text=True
        )
        assert cut.returncode == 0, cut.stderr
        expect(page.locator("footer .connection")).to_have_text("reconnecting…")
        gate.write("\n\n")  # both steps while the page is cut off: it misses their events
        gate.flush()
        wait_until(lambda: job_of(daemon, job_id)["status"] == "succeeded", what="the job")
        context.unroute("**/ui/events*")
    expect(page.locator("footer .connection")).to_have_text("live", timeout=20_000)
    expect(page.locator("#job-status")).to_have_text("succeeded")  # read again on reconnecting
    expect(page.locator("ol.log")).to_contain_text("step 2 of 2")
    # htmx logs the lost stream (an Event), and a request the cut caught in flight, as errors:
    # here they were meant.
    meant = ("[object Event]", "htmx:sendError", "htmx:afterRequest")
    CONSOLE_ERRORS[:] = [text for text in CONSOLE_ERRORS if not text.startswith(meant)]


def test_running_a_task_from_its_page_shows_the_servers_validation_error(
    context: BrowserContext, daemon: Taskd
) -> None:
    page = signed_in(context, daemon)
    page.get_by_role("link", name="Tasks").click()
    email = page.locator("#task-email")
    email.get_by_text("Run…").click()
    email.get_by_text("Payload schema").click()
    expect(email.locator("pre")).to_contain_text('"to"')
    email.get_by_label("Payload (JSON)").fill('{"to": 5, "subject": "s", "body": "b"}')
    email.get_by_role("button", name="Run").click()
    alert = page.locator("#task-email").get_by_role("alert")
    expect(alert).to_contain_text("$.to")  # the server's message, next to the field
    expect(page.locator("#task-email").get_by_label("Payload (JSON)")).to_have_value(
        '{"to": 5, "subject": "s", "body": "b"}'
    )
    echo = page.locator("#task-echo")
    echo.get_by_text("Run…").click()
    echo.get_by_label("Payload (JSON)").fill('{"name": "Ada"}')
    echo.get_by_role("button", name="Run").click()
    expect(page).to_have_url(re.compile(r"/ui/jobs/\d+$"))
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("main")).to_contain_text('"name": "Ada"')


def test_pausing_a_task_and_the_overview_following_the_queue_live(
    context: BrowserContext, daemon: Taskd
) -> None:
    page = signed_in(context, daemon)
    pending = page.locator("dl.counts div").filter(has_text="pending").locator("dd")
    before = int(pending.inner_text())
    page.evaluate("window.notReloaded = true")
    expect(page.locator("footer .connection")).to_have_text("live")
    api(daemon).post("/jobs", {"task": "echo", "delay": "1h"})
    expect(pending).to_have_text(str(before + 1))
    assert page.evaluate("window.notReloaded") is True
    page.goto(base(daemon) + "/ui/tasks")
    page.locator("#task-echo").get_by_role("button", name="Pause").click()
    expect(page.locator("#task-echo")).to_contain_text("Paused since")
    assert "echo" in json.loads(daemon.ctl("status", "--json").stdout)["paused_tasks"]
    page.locator("#task-echo").get_by_role("button", name="Resume").click()
    expect(page.locator("#task-echo").get_by_role("button", name="Pause")).to_be_visible()
    assert "echo" not in json.loads(daemon.ctl("status", "--json").stdout)["paused_tasks"]


def nightly(daemon: Taskd) -> dict[str, Any]:
    schedules = json.loads(daemon.ctl("schedules", "--json").stdout)
    (schedule,) = (s for s in schedules if s["id"] == "nightly")
    return dict(schedule)


def test_pausing_and_triggering_a_schedule(context: BrowserContext, daemon: Taskd) -> None:
    page = signed_in(context, daemon)
    page.get_by_role("link", name="Schedules").click()
    row = page.locator("#schedule-nightly")
    expect(row).to_contain_text("active")
    row.get_by_role("button", name="Pause").click()
    expect(row).to_contain_text("paused")
    assert nightly(daemon)["paused"] is True
    row.get_by_role("button", name="Trigger").click()
    wait_until(lambda: nightly(daemon)["last_jobs"], what="the trigger's job")
    page.reload()
    expect(row.get_by_role("link", name=re.compile(r"echo \d+"))).to_be_visible()
    row.get_by_role("button", name="Resume").click()
    expect(row).to_contain_text("active")


def test_times_are_shown_in_the_browsers_zone(browser: Browser, daemon: Taskd) -> None:
    context = browser.new_context(timezone_id="Asia/Tokyo")
    context.on("request", lambda request: REQUESTS.append(request.url))
    try:
        page = signed_in(context, daemon)
        page.goto(base(daemon) + "/ui/jobs")
        expect(page.locator("footer .zone")).to_have_text("Asia/Tokyo")
        expect(page.locator("time").first).to_contain_text("GMT+9")
    finally:
        context.close()


def test_keyboard_only_at_400_px_wide_in_dark_mode(browser: Browser, daemon: Taskd) -> None:
    context = browser.new_context(viewport={"width": 400, "height": 800}, color_scheme="dark")
    context.on("request", lambda request: REQUESTS.append(request.url))
    try:
        page = context.new_page()
        page.goto(base(daemon) + "/ui/sign-in")
        # The Token field has the focus (keys typed before it has would be lost: wait for it).
        expect(page.get_by_role("textbox", name="Token")).to_be_focused()
        page.keyboard.type(TOKEN)
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
        page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Tasks")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Tasks", level=1)).to_be_visible()
        dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert dark == "rgb(13, 17, 23)"
        for path in ("/ui/", "/ui/tasks", "/ui/jobs", "/ui/schedules"):
            page.goto(base(daemon) + path)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 400, (path, width)  # wide tables scroll inside their own box
    finally:
        context.close()


def test_no_request_left_127_0_0_1() -> None:
    assert REQUESTS, "the tests above made no request"
    assert_local(REQUESTS)
    paths = {urllib.parse.urlsplit(url).path for url in REQUESTS}
    assert {"/ui/static/htmx.min.js", "/ui/events"} <= paths  # what the pages load, recorded


def screenshots(daemon: Taskd, browser: Browser, folder: Path) -> None:
    """The Overview and Jobs pages, light and dark, 1000 px wide (docs/, the README)."""
    for scheme in ("light", "dark"):
        context = browser.new_context(
            viewport={"width": 1000, "height": 700}, color_scheme=scheme, timezone_id="UTC"
        )
        page = signed_in(context, daemon)
        page.screenshot(path=str(folder / f"dashboard-overview-{scheme}.png"), full_page=False)
        page.goto(base(daemon) + "/ui/jobs")
        page.screenshot(path=str(folder / f"dashboard-jobs-{scheme}.png"), full_page=False)
        context.close()
