"""`make test-systemd`: build (or reuse) the Debian root, then run tests/systemd.

Where systemd-nspawn cannot run (not root, not installed, no container support) it says so
in one line and succeeds; with CI set it fails instead, so that CI cannot skip it unseen.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.systemd import container


def main(arguments: list[str]) -> int:
    reason = container.unavailable()
    if reason is None:
        reason = container.cannot_boot(container.root_filesystem())
    if reason is not None and os.environ.get("CI"):
        print(f"make test-systemd: cannot run here, and CI must: {reason}", flush=True)
        return 1
    if reason is not None:
        print(f"make test-systemd: skipped: {reason}", flush=True)
        return 0
    return pytest.main(["-m", "nspawn", str(Path(__file__).parent), *arguments])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
