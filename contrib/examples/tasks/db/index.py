"""db (from db/index.py): calls another task through the same job store."""

from taskd import TaskContext, define_task


@define_task(description="Rebuild the search index, then clean up")
async def rebuild_index(ctx: TaskContext) -> dict:
    cleaned = await ctx.run_task("scheduled:cleanup")
    return {"indexed": 42, "cleanup": cleaned}
