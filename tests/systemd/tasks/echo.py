"""Returns its payload: a call that shows taskd answering."""

from taskd import define_task


@define_task(description="Return the payload")
async def echo(payload: dict) -> dict:
    return payload
