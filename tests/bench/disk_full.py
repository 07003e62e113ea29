"""What freed space is worth to a SQLite job store on a full disk (root: it mounts a tmpfs).

    python -m tests.bench.disk_full [--size 2m] [--freed 512] [--spare 128]

A real taskd keeps its database on a small tmpfs, beside files of `--freed` and `--spare`
KiB. Email-sized jobs are enqueued one by one until one is refused; then the first file is
removed and jobs are enqueued again until one is refused. After a clean stop the second
file is removed and taskd started again. Prints how many jobs each round took, the sizes of
the database and its WAL, and whether the restart worked.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

from taskctl.errors import TaskdError
from tests.support import Taskd, short_tempdir

PAYLOAD = {"to": "ada@example.com", "subject": "Hi", "body": "Welcome!"}


def enqueue_until_refused(daemon: Taskd) -> int:
    accepted = 0
    with daemon.client() as client:
        while True:
            try:
                client.enqueue("echo", PAYLOAD, delay="1h")
            except TaskdError:
                return accepted
            accepted += 1


def files(database: Path) -> str:
    def size(path: Path) -> str:
        return f"{path.stat().st_size / 1024:.0f} KiB" if path.exists() else "none"

    free = os.statvfs(database.parent)
    return (
        f"database {size(database)}, WAL {size(Path(f'{database}-wal'))}, "
        f"free {free.f_bavail * free.f_frsize / 1024:.0f} KiB"
    )


def measure(root: Path, size: str, freed_kib: int, spare_kib: int) -> None:
    disk = root / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(disk)],
                   check=True)  # fmt: skip
    try:
        freed, spare = disk / "freed", disk / "spare"
        freed.write_bytes(b"\0" * freed_kib * 1024)
        spare.write_bytes(b"\0" * spare_kib * 1024)
        daemon = Taskd(root, log_level="info")
        daemon.database = disk / "taskd.db"
        daemon.start()
        print(
            f"jobs until the first refusal: {enqueue_until_refused(daemon)};",
            files(daemon.database),
        )
        freed.unlink()
        after = enqueue_until_refused(daemon)
        print(f"jobs after freeing {freed_kib} KiB: {after}; {files(daemon.database)}")
        daemon.stop()
        print(f"after a clean stop: {files(daemon.database)}")
        spare.unlink()
        print(f"restart after freeing {spare_kib} KiB more:")
        daemon.start(wait=False)
        assert daemon.process is not None
        try:
            daemon.wait_for_notification("READY=1", 30)
            print(f"  ready; {files(daemon.database)}")
            daemon.stop()
        except AssertionError:
            refusal = [line for line in daemon.log.splitlines() if "cannot start" in line]
            print(f"  refused: {refusal[-1] if refusal else daemon.log[-500:]}")
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2m", help="of the tmpfs (mount's size=)")
    parser.add_argument("--freed", type=int, default=512, help="KiB freed once it is full")
    parser.add_argument("--spare", type=int, default=128, help="KiB freed after the stop")
    args = parser.parse_args(argv)
    root = short_tempdir()
    try:
        measure(root, args.size, args.freed, args.spare)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
