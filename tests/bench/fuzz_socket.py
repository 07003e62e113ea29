"""Fuzz a live taskd's control socket and print the figures.

    .venv/bin/python -m tests.bench.fuzz_socket [--frames 100000] [--seed N]

Starts taskd on a temporary folder (the fuzzing tasks of tests/fuzzing.py), enqueues 40
sentinel jobs, throws the frames, then checks that taskd still answers, that the sentinel
jobs are intact and that no reply was an internal error, and prints frames sent, replies by
code and taskd's resident memory (VmRSS) at start, after the warm-up, at its peak and at
the end. tests/e2e/test_fuzz.py runs the same (TASKD_FUZZ_FRAMES sets its frame count).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from tests.fuzzing import campaign, write_tasks
from tests.support import Taskd, short_tempdir, wait_until

MAX_FRAME = 1024 * 1024
CONFIG = f'max_frame_size = {MAX_FRAME}\nread_timeout = "5s"\n'
SENTINELS = 40


def sentinel_payload(n: int) -> dict[str, object]:
    return {"n": n, "text": f"sentinel {n} ✓", "blob": bytes(range(n, n + 32)), "big": 2**62 + n}


def start_daemon(root: Path) -> Taskd:
    return Taskd(
        root, tasks=write_tasks(root / "tasks"), config=CONFIG, log_level="warning"
    ).start()


def enqueue_sentinels(daemon: Taskd) -> list[int]:
    with daemon.client() as client:
        return [
            client.enqueue("sentinel", sentinel_payload(n), delay="1d").job_id
            for n in range(SENTINELS)
        ]


def check_sentinels(daemon: Taskd, ids: list[int]) -> None:
    with daemon.client() as client:
        jobs = client.jobs(task="sentinel", limit=1000)
        assert sorted(job.id for job in jobs) == sorted(ids), "sentinel jobs were lost or added"
        for n, job_id in enumerate(ids):
            job = client.job(job_id)
            assert job.status == "pending", job
            assert job.payload == sentinel_payload(n), job


def due_jobs(daemon: Taskd) -> list[int]:
    """Jobs that are due or running, other than the sentinels: the executor owes them a run."""
    now = time.time()
    with daemon.client() as client:
        jobs = client.jobs(status=["pending", "running"], limit=10_000)
    return [job.id for job in jobs if job.task != "sentinel" and job.run_at <= now]


def check_nothing_is_stuck(daemon: Taskd) -> None:
    """Every job the fuzzing queued for now gets run, even if its client hung up at once."""
    wait_until(lambda: not due_jobs(daemon), timeout=30, what="the due jobs to be run")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, help="vary the frames (default: a fixed set)")
    args = parser.parse_args()
    root = short_tempdir()
    daemon = start_daemon(root)
    try:
        assert daemon.process is not None
        ids = enqueue_sentinels(daemon)
        report = campaign(
            daemon.socket, daemon.process.pid, args.frames, max_frame=MAX_FRAME, seed=args.seed
        )
        print(report.summary())
        for reply in report.internal[:10]:
            print("internal error:", reply)
        assert daemon.ctl("status").returncode == 0, "taskd no longer answers"
        check_sentinels(daemon, ids)
        check_nothing_is_stuck(daemon)
        print(
            f"taskd still answers; the {SENTINELS} sentinel jobs are intact; due jobs ran; "
            f"{len(report.internal)} internal errors"
        )
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log, daemon.log
        return 0 if not report.internal else 1
    finally:
        if daemon.running:
            daemon.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
