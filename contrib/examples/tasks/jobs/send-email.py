"""jobs:send-email: a typed payload, validated before the task runs."""

import asyncio
from datetime import UTC, datetime

import msgspec

from taskd import TaskContext, define_task


class Email(msgspec.Struct):
    to: str
    subject: str
    body: str


@define_task(description="Send an email in the background", timeout="30s", max_attempts=5)
async def send_email(payload: Email, ctx: TaskContext) -> dict:
    ctx.logger.info("sending %r to %s", payload.subject, payload.to)
    await asyncio.sleep(0.1)  # stands in for talking to the mail server
    return {"result": "success", "sent_at": datetime.now(UTC).isoformat()}
