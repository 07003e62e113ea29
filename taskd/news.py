"""The daemon's own news of the jobs it runs, for live views (`subscribe`, taskctl top) and
the status line: an attempt started here, its progress and its log lines (told before they
are written, if they ever are), and "changed": jobs were added, started or ended.

The store's notifications (taskd.store.events) stay the store's; the daemon relays the
store's "changed" here, so that a listener hears every change on one bus.
"""

from __future__ import annotations

from collections.abc import Callable

from taskd.listeners import Listeners
from taskd.models import Job, LogLine, Progress


class DaemonNews:
    """Listeners of the daemon's news, and the calls that tell it."""

    def __init__(self) -> None:
        self._started = Listeners("started jobs")
        self._progress = Listeners("progress")
        self._log = Listeners("log lines")
        self._changed = Listeners("changes")
        # Told once or twice a job: the listeners themselves, no method of ours in between.
        self.started: Callable[[Job], None] = self._started  # an attempt of it started here
        # Jobs were added, started or ended, here or (relayed) in the store.
        self.changed: Callable[[], None] = self._changed

    def on_started(self, listener: Callable[[Job], None]) -> None:
        self._started.add(listener)

    def on_progress(self, listener: Callable[[int, Progress], None]) -> None:
        self._progress.add(listener)

    def on_log(self, listener: Callable[[int, LogLine], None]) -> None:
        self._log.add(listener)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever jobs are added, started or ended (it must be cheap)."""
        self._changed.add(listener)

    def progress(self, job_id: int, progress: Progress) -> None:
        """A job running here reported progress (before it is written, if it ever is)."""
        self._progress(job_id, progress)

    def log(self, job_id: int, line: LogLine) -> None:
        """A job running here wrote a line (before it is written)."""
        self._log(job_id, line)
