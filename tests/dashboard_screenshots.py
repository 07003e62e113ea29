"""The README's screenshots of the dashboard: `python -m tests.dashboard_screenshots`.

Starts taskd on the example tasks (contrib/examples) with an [http] table, gives it some
work (jobs that succeed, fail and wait), and saves the Overview and Jobs pages as the
headless Chromium of the browser tests shows them, 1000 px wide, into docs/.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.http_support import TOKEN, HttpClient, http_config, http_port
from tests.support import Taskd, short_tempdir, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "contrib" / "examples"
CHROMIUM = "/usr/bin/chromium"


def give_it_work(api: HttpClient) -> None:
    for name in ("Ada", "Grace", "Linus", "Barbara"):
        api.get(f"/tasks/hello?name={name}")
    for index in range(6):
        api.post("/jobs", {"task": "flaky", "payload": {"attempt": index}, "max_attempts": 1})
    email = {"to": "ada@example.com", "subject": "Hi", "body": "Welcome!"}
    for _ in range(3):
        api.post("/jobs", {"task": "jobs:send-email", "payload": email})
    api.post("/jobs", {"task": "jobs:send-email", "payload": email, "delay": "1h"})


def main(folder: Path) -> None:
    root = short_tempdir()
    tasks = root / "tasks"
    shutil.copytree(EXAMPLES / "tasks", tasks)
    schedules = (EXAMPLES / "taskd.toml").read_text()
    daemon = Taskd(root, tasks=tasks, config=schedules + "\n" + http_config(), log_level="info")
    daemon.start()
    try:
        api = HttpClient.of(daemon)
        give_it_work(api)
        wait_until(lambda: not api.get("/jobs?status=running").json()["jobs"], what="quiet")
        base = f"http://127.0.0.1:{http_port(daemon)}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            for scheme in ("light", "dark"):
                context = browser.new_context(
                    viewport={"width": 1000, "height": 760},
                    color_scheme=scheme,
                    timezone_id="Europe/Berlin",
                )
                page = context.new_page()
                page.goto(base + "/ui/sign-in")
                page.get_by_label("Token").fill(TOKEN)
                page.get_by_role("button", name="Sign in").click()
                page.get_by_text("live", exact=True).wait_for()
                page.screenshot(path=folder / f"dashboard-overview-{scheme}.png")
                page.goto(base + "/ui/jobs")
                page.screenshot(path=folder / f"dashboard-jobs-{scheme}.png")
                context.close()
            browser.close()
    finally:
        daemon.stop()
        daemon.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs")
