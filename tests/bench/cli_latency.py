"""Wall time of `taskctl list` against a running daemon, next to `python -c "import msgspec"`.

Both are measured in the same run, alternating, so machine load affects them alike.
Usage: python tests/bench/cli_latency.py [--runs N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support import TASKCTL, Taskd, short_tempdir


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    root = short_tempdir()
    daemon = Taskd(root).start()
    try:
        taskctl = [TASKCTL or sys.executable, "--socket", str(daemon.socket), "list"]
        if TASKCTL is None:
            taskctl[1:1] = ["-m", "taskctl"]
        baseline = [sys.executable, "-c", "import msgspec"]
        bare = [sys.executable, "-c", "pass"]
        for command in (taskctl, baseline, bare):  # warm the page cache
            timed(command)
        samples: dict[str, list[float]] = {"taskctl list": [], "import msgspec": [], "python": []}
        for _ in range(args.runs):
            samples["taskctl list"].append(timed(taskctl))
            samples["import msgspec"].append(timed(baseline))
            samples["python"].append(timed(bare))
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    reference = statistics.median(samples["import msgspec"])
    print(f"{args.runs} runs each, median wall time:")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  {name:<16} {median * 1000:6.1f} ms   ({median / reference:.2f}x import msgspec)")


if __name__ == "__main__":
    main()
