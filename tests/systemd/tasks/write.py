"""Writes a file where the payload says."""

from pathlib import Path

from taskd import define_task


@define_task(description="Write a file", max_attempts=1)
def write(payload: dict) -> str:
    Path(payload["path"]).write_text("written by a task\n")
    return payload["path"]
