"""Webhook events ([[webhook]] in taskd.toml) as jobs of the built-in task WEBHOOK_TASK,
inserted in the transaction that records what they tell of (a job's end, a batch's end, a
schedule's missed ticks): a crash never loses one nor makes two. The rules come with the
transaction (`Tx.webhooks`); a delivery's own end triggers none."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import msgspec

from taskd.models import FINISHED_STATUSES, WEBHOOK_TASK, Job, WebhookRule
from taskd.store.base import MissedTicks, NewJob
from taskd.store.core.dialect import Tx


def wants(rule: WebhookRule, event: str, task: str | None) -> bool:
    """Whether `rule` receives `event` about a job (or a batch callback) of `task`."""
    return wants_any(rule, event, () if task is None else (task,))


def wants_any(rule: WebhookRule, event: str, tasks: Sequence[str]) -> bool:
    """Whether `rule` receives `event` about one of `tasks` (a schedule's)."""
    if event not in rule.events:
        return False
    if not rule.tasks:
        return True
    return any(fnmatch.fnmatchcase(task, p) for task in tasks for p in rule.tasks)


def schedule_events(tx: Tx, missed: MissedTicks) -> list[NewJob]:
    """The deliveries of the report of ticks a schedule missed (the rules' `tasks` patterns
    match any of the schedule's tasks)."""
    rules = [rule for rule in tx.webhooks if wants_any(rule, "schedule.missed", missed.tasks)]
    if not rules:
        return []
    body = {
        "event": "schedule.missed",
        "schedule": {
            "id": missed.schedule,
            "tasks": list(missed.tasks),
            "missed": missed.missed,
            "count": missed.count,
            "count_exact": missed.exact,
            "last": missed.last,
            "fired": missed.fired,
        },
    }
    return [_delivery(rule, "schedule.missed", body, None) for rule in rules]


def job_events(tx: Tx, jobs: Sequence[Job]) -> list[NewJob]:
    """The deliveries of the ends of `jobs` (succeeded, failed for good, cancelled)."""
    if not tx.webhooks:
        return []
    deliveries = []
    for job in jobs:
        if job.status not in FINISHED_STATUSES or job.task == WEBHOOK_TASK:
            continue
        event = f"job.{job.status}"
        body = {"event": event, "job": _job_body(job)}
        deliveries += [
            _delivery(rule, event, body, job.id) for rule in tx.webhooks
            if wants(rule, event, job.task)
        ]  # fmt: skip
    return deliveries


def batch_events(tx: Tx, finished: Sequence[tuple[int, NewJob | None]]) -> list[NewJob]:
    """The deliveries of the ends of batches (their callback's task, if any, is what the
    rules' `tasks` patterns match)."""
    deliveries = []
    for batch, callback in finished:
        task = callback.task if callback is not None else None
        body = {"event": "batch.finished", "batch": {"id": batch, "on_finish": task}}
        deliveries += [
            _delivery(rule, "batch.finished", body, None) for rule in tx.webhooks
            if wants(rule, "batch.finished", task)
        ]  # fmt: skip
    return deliveries


def _job_body(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "task": job.task,
        "status": job.status,
        "error": job.error,
        "attempts": job.attempts,
        "finished_at": job.finished_at,
        "batch": job.batch_id,
    }


def _delivery(rule: WebhookRule, event: str, body: dict[str, Any], job: int | None) -> NewJob:
    # The body is encoded here, once: the bytes signed and sent are those the store keeps.
    payload = {"url": rule.url, "event": event, "body": msgspec.json.encode(body).decode()}
    return NewJob(
        task=WEBHOOK_TASK,
        payload=msgspec.msgpack.encode(payload),
        origin="hook",
        max_attempts=rule.max_attempts,
        parent_id=job,
    )
