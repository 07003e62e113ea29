"""What start-up builds is kept out of the garbage collector's full collections."""

from __future__ import annotations

import gc
import shutil

from taskd.config import Config, Paths
from taskd.daemon import GC_THRESHOLDS, Daemon
from tests.support import short_tempdir


async def test_start_up_freezes_what_it_built_and_collects_less_often() -> None:
    root = short_tempdir()
    (root / "tasks").mkdir()
    config = Config()
    paths = Paths(
        tasks=root / "tasks", database=f"sqlite://{root / 'taskd.db'}", socket=root / "s.sock"
    )
    daemon = Daemon(lambda: (config, paths), config, paths, allow_empty_store=True)
    thresholds = gc.get_threshold()
    gc.unfreeze()
    try:
        await daemon.startup()
        assert gc.get_freeze_count() > 0  # a full collection no longer reads start-up's objects
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        await daemon.shutdown()
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        shutil.rmtree(root, ignore_errors=True)
