"""reports:daily: a strict payload with a default, progress and log lines kept with the job,
and, when its schedule starts it, the tick's time from `ctx.scheduled_time`."""

import time
from datetime import UTC, datetime

import msgspec

from taskd import TaskContext, define_task


class Report(msgspec.Struct, forbid_unknown_fields=True):
    sections: int = 3


@define_task(description="Write the daily report, a section at a time", concurrency=1)
def daily(payload: Report, ctx: TaskContext) -> dict:
    day = (ctx.scheduled_time or datetime.now(UTC)).date()
    for number in range(1, payload.sections + 1):
        time.sleep(0.2)  # stands in for querying and writing a section
        ctx.logger.info("section %d of %d written", number, payload.sections)
        ctx.progress(number, payload.sections, f"section {number}")
    return {"date": day.isoformat(), "sections": payload.sections}
