"""The dashboard's sign-in, sessions and guards against a real taskd, over real HTTP.

What a browser does with the pages is tested with a real browser in test_dashboard_browser.py;
here: the cookie's attributes, the security headers, CSRF and read-only refusals, the bound
on sessions, `dashboard = false`, and that no token reaches a log.
"""

from __future__ import annotations

import re
import urllib.parse

import pytest

from tests.http_support import READONLY_TOKEN, TOKEN, HttpClient, Response, http_config, http_stats
from tests.support import Taskd

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class Browser:
    """Requests with the session cookie that signing in set, as a browser sends them."""

    def __init__(self, daemon: Taskd) -> None:
        self.http = HttpClient.of(daemon, token=None)
        self.cookie = ""

    def sign_in(self, token: str) -> Response:
        reply = self.post("/ui/sign-in", {"token": token})
        if "set-cookie" in reply.headers:
            self.cookie = reply.headers["set-cookie"].split(";")[0]
        return reply

    def get(self, path: str, **headers: str) -> Response:
        return self.http.get(path, headers={"Cookie": self.cookie, **headers})

    def post(self, path: str, fields: dict[str, str], **headers: str) -> Response:
        body = urllib.parse.urlencode(fields)
        return self.http.post(path, body, headers={"Cookie": self.cookie, **FORM, **headers})

    def csrf(self) -> str:
        page = self.get("/ui/").body.decode()
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        assert match, page
        return match.group(1)


@pytest.fixture
def daemon(taskd_factory: type[Taskd]) -> Taskd:
    return taskd_factory(config=http_config(max_sessions=2, trusted_proxies=["127.0.0.1"])).start()


def test_signing_in_gives_a_strict_http_only_cookie_and_signing_out_ends_it(daemon: Taskd) -> None:
    browser = Browser(daemon)
    first = browser.get("/ui/")
    assert first.status == 303 and first.headers["location"] == "/ui/sign-in"
    page = browser.get("/ui/sign-in")
    assert page.status == 200
    assert re.search(rb'<label for="token">Token</label>', page.body)
    assert b'type="password"' in page.body and b">Sign in</button>" in page.body
    assert browser.sign_in("not-the-token-0123456789").status == 401
    reply = browser.sign_in(TOKEN)
    assert reply.status == 303 and reply.headers["location"] == "/ui/"
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain HTTP, no proxy said otherwise
    overview = browser.get("/ui/")
    assert overview.status == 200 and b"Jobs by status" in overview.body
    # The cookie is the dashboard's only: the JSON API still wants a token.
    assert browser.get("/jobs").status == 401
    signed_out = browser.post("/ui/sign-out", {"csrf": browser.csrf()})
    assert signed_out.status == 303 and "Max-Age=0" in signed_out.headers["set-cookie"]
    assert browser.get("/ui/").status == 303  # to the sign-in page again
    assert TOKEN not in daemon.log and READONLY_TOKEN not in daemon.log


def test_every_page_has_the_security_headers(daemon: Taskd) -> None:
    browser = Browser(daemon)
    browser.sign_in(TOKEN)
    for path in ("/ui/sign-in", "/ui/", "/ui/tasks", "/ui/jobs", "/ui/schedules",
                 "/ui/static/htmx.min.js"):  # fmt: skip
        headers = browser.get(path).headers
        policy = headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy, path
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"


def test_a_post_without_the_csrf_token_or_from_a_read_only_session_is_refused(
    daemon: Taskd,
) -> None:
    full, readonly = Browser(daemon), Browser(daemon)
    full.sign_in(TOKEN)
    readonly.sign_in(READONLY_TOKEN)
    assert full.post("/ui/tasks/echo/pause", {"back": "/ui/tasks"}).status == 403
    assert full.post("/ui/tasks/echo/pause", {"csrf": "forged"}).status == 403
    assert "echo" not in daemon.ctl("status", "--json").stdout.split('"paused_tasks"')[1]
    # A read-only session sees no action, and its forged action is refused all the same.
    assert b"<button" not in readonly.get("/ui/tasks").body.split(b"</header>")[1]
    refused = readonly.post("/ui/tasks/echo/pause", {"csrf": readonly.csrf()})
    assert refused.status == 403
    done = full.post("/ui/tasks/echo/pause", {"csrf": full.csrf(), "back": "/ui/tasks"})
    assert done.status == 303 and done.headers["location"] == "/ui/tasks"
    assert '"echo"' in daemon.ctl("status", "--json").stdout.split('"paused_tasks"')[1]


def test_sessions_are_bounded_and_counted_in_status(daemon: Taskd) -> None:
    browsers = [Browser(daemon) for _ in range(3)]
    for browser in browsers:
        assert browser.sign_in(TOKEN).status == 303
    assert browsers[0].get("/ui/").status == 303  # signed out to make room for the third
    assert browsers[2].get("/ui/").status == 200
    stats = http_stats(daemon)
    assert (stats["sessions"], stats["max_sessions"], stats["sessions_evicted"]) == (2, 2, 1)
    assert "dashboard sessions: 2 signed in, at most 2" in daemon.ctl("status").stdout
    assert "max_sessions" in daemon.log


def test_the_cookie_is_secure_behind_a_trusted_https_proxy(daemon: Taskd) -> None:
    browser = Browser(daemon)
    body = urllib.parse.urlencode({"token": TOKEN})
    reply = browser.http.post("/ui/sign-in", body, headers={**FORM, "X-Forwarded-Proto": "https"})
    assert "; Secure" in reply.headers["set-cookie"]


def test_a_browser_asking_for_the_root_is_sent_to_the_dashboard(daemon: Taskd) -> None:
    api = HttpClient.of(daemon, token=None)
    reply = api.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert reply.status == 303 and reply.headers["location"] == "/ui/"
    assert api.get("/", headers={"Accept": "application/json"}).status == 404


def test_dashboard_false_turns_it_off(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=http_config(dashboard=False)).start()
    api = HttpClient.of(daemon, token=None)
    assert api.get("/ui/sign-in").status in (401, 404)
    assert HttpClient.of(daemon).get("/ui/").status == 404
    assert http_stats(daemon)["max_sessions"] == 0


def test_a_reload_without_a_token_signs_out_its_sessions(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=http_config()).start()
    full, readonly = Browser(daemon), Browser(daemon)
    full.sign_in(TOKEN)
    readonly.sign_in(READONLY_TOKEN)
    daemon.config_file.write_text(f'[http]\nlisten = "127.0.0.1:0"\ntokens = ["{TOKEN}"]\n')
    assert daemon.ctl("reload").returncode == 0
    assert full.get("/ui/").status == 200
    assert readonly.get("/ui/").status == 303  # to the sign-in page
    assert readonly.sign_in(READONLY_TOKEN).status == 401


def test_cancel_all_matching_says_how_many_first(daemon: Taskd) -> None:
    api = HttpClient.of(daemon)
    ids = [api.post("/jobs", {"task": "slow", "delay": "1h"}).json()["job_id"] for _ in range(3)]
    browser = Browser(daemon)
    browser.sign_in(TOKEN)
    page = browser.get("/ui/jobs/confirm?action=cancel&task=slow").body.decode()
    assert "Cancel <strong>3</strong> pending or running jobs matching task = slow" in page
    done = browser.post("/ui/jobs/cancel", {"csrf": browser.csrf(), "task": "slow"})
    assert done.status == 200 and b"Cancelled 3 jobs." in done.body
    assert {api.get(f"/jobs/{job_id}").json()["status"] for job_id in ids} == {"cancelled"}
    none = browser.get("/ui/jobs/confirm?action=cancel&task=slow").body
    assert b"No pending or running job matches task = slow" in none


def test_a_jobs_page_links_its_parents_and_children(daemon: Taskd) -> None:
    api = HttpClient.of(daemon)
    parent = api.post("/jobs", {"task": "echo", "delay": "1h"}).json()["job_id"]
    child = api.post("/jobs", {"task": "echo", "after": [parent]}).json()["job_id"]
    browser = Browser(daemon)
    browser.sign_in(TOKEN)
    child_page = browser.get(f"/ui/jobs/{child}").body.decode()
    assert f'parent <a href="/ui/jobs/{parent}">{parent}</a>' in child_page
    parent_page = browser.get(f"/ui/jobs/{parent}").body.decode()
    assert f'child <a href="/ui/jobs/{child}">{child}</a>' in parent_page
    assert "<h2>Why</h2>" in child_page and "created" in child_page
