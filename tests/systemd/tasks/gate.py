"""Keeps a job running until the test lets it go, through two FIFOs the test made.

Opening /srv/gate/started for writing waits for the test to read it: that is how the test
learns that the job runs, without looking again and again. The job then waits until the
test writes to /srv/gate/release. FIFOs work on the read-only /srv that taskd sees.
"""

import os

from taskd import TaskContext, define_task


@define_task(description="Run until the test opens the gate")
def gate(ctx: TaskContext) -> dict:
    with open("/srv/gate/started", "w") as started:
        started.write(f"{ctx.job_id}\n")
    with open("/srv/gate/release") as release:
        release.read()
    return {"pid": os.getpid(), "attempt": ctx.attempt}
