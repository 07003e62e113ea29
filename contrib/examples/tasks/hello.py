"""The smallest task: a payload that is a map (without one, as in Nitro, it is {})."""

from taskd import TaskContext, define_task


@define_task(description="Say hello (payload: {\"name\": ...})")
async def hello(payload: dict, ctx: TaskContext) -> dict:
    name = payload.get("name", "world")
    ctx.logger.info("greeting %s", name)
    return {"greeting": f"Hello, {name}!", "job": ctx.job_id}
