"""flaky: fails its first attempt, as a service that does not answer would; taskd retries it
after `backoff` (2 s here; a minute by default), and `taskctl run` says so while it waits."""

from taskd import TaskContext, define_task


@define_task(description="Fail the first attempt, succeed the next", max_attempts=3, backoff="2s")
async def flaky(ctx: TaskContext) -> dict:
    if ctx.attempt == 1:
        raise ConnectionError("the service did not answer")
    return {"job": ctx.job_id, "attempt": ctx.attempt}
