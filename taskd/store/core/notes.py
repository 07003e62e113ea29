"""What a write transaction changed that listeners care about, told once it has committed."""

from __future__ import annotations

from dataclasses import dataclass, field

from taskd.models import FINISHED_STATUSES, Job
from taskd.store.events import JobEvents


@dataclass(slots=True)
class Notes:
    """The events of one transaction (see `Store.events`), noted by its operations."""

    due: float | None = None  # seconds until the earliest job it made claimable again
    new: dict[int, float] = field(default_factory=dict)  # new jobs left pending: id -> due in
    finished: list[Job] = field(default_factory=list)
    retrying: list[Job] = field(default_factory=list)  # an attempt failed; another follows
    cancelled: list[int] = field(default_factory=list)
    # progress or lines recorded: (job id, epoch, first line's seq or -1, progress recorded)
    activity: list[tuple[int, int, int, bool]] = field(default_factory=list)

    def made_due(self, delay: float) -> None:
        self.due = delay if self.due is None else min(self.due, delay)

    def ended(self, job: Job, due_in: float, *, retrying: bool) -> None:
        """An attempt ended (an outcome, a recovery): the job finished, or is due again."""
        if job.status in FINISHED_STATUSES:
            self.finished.append(job)
            return
        self.made_due(due_in)
        if retrying:
            self.retrying.append(job)

    def claimed(self, jobs: list[Job]) -> None:
        """New jobs a claim took in the same transaction are no news to anyone."""
        if not self.new:  # a claim alone: it inserted nothing
            return
        for job in jobs:
            self.new.pop(job.id, None)


def tell(events: JobEvents, notes: Notes) -> None:
    """This daemon's listeners hear of a committed transaction."""
    # No call, no list made, for what did not happen: this runs at every write (an enqueue's
    # notes have one new job, and nothing else).
    if notes.finished:
        events.finished_all(notes.finished)
    for job in notes.retrying:
        events.retrying(job)
    for job_id in notes.cancelled:
        events.cancel_requested(job_id)
    due = notes.due
    if notes.new:
        soonest = min(notes.new.values())
        due = soonest if due is None else min(due, soonest)
    if due is not None:
        events.due(due)
