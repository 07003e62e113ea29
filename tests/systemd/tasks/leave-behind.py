"""Starts a process of its own session and returns without waiting for it."""

import subprocess

from taskd import define_task


@define_task(description="Leave a process behind")
def leave_behind() -> int:
    # Not waited for: it outlives the job, as a daemon a careless task starts would.
    process = subprocess.Popen(
        ["sleep", "infinity"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process.pid
