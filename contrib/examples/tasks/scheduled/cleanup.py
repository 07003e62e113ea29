"""scheduled:cleanup: a plain function runs in the thread pool, so it may block."""

import time
from pathlib import Path

from taskd import define_task


@define_task(description="Delete temporary files older than a day")
def cleanup(payload: dict | None) -> dict:
    folder = Path((payload or {}).get("folder", "/tmp/taskd-example-cache"))
    cutoff = time.time() - 86400
    removed = 0
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return {"removed": removed, "folder": str(folder)}
