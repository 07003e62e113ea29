"""The smallest task: no payload schema, returns a greeting."""

from taskd import TaskContext, define_task


@define_task(description="Say hello (payload: {\"name\": ...})")
async def hello(payload: dict | None, ctx: TaskContext) -> dict:
    name = (payload or {}).get("name", "world")
    ctx.logger.info("greeting %s", name)
    return {"greeting": f"Hello, {name}!", "job": ctx.job_id}
