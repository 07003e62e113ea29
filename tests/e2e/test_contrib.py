"""The systemd units in contrib/systemd pass `systemd-analyze verify`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONTRIB = Path(__file__).parents[2] / "contrib" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
BIN = str(Path(sys.executable).parent)


def verify(folder: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, *extra, "verify", "./taskd.service", "./taskd.socket"],
        cwd=folder, capture_output=True, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    output = result.stdout + result.stderr
    if "Failed to initialize manager" in output:
        pytest.skip(f"systemd-analyze cannot run here: {output.strip()}")
    assert result.returncode == 0, output
    return output


def installed(source: Path, target: Path, bin_folder: str) -> Path:
    """The units as installed, with taskd and taskctl from this checkout's environment."""
    target.mkdir()
    for unit in ("taskd.service", "taskd.socket"):
        text = (source / unit).read_text().replace(bin_folder, BIN)
        (target / unit).write_text(text)
    return target


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_system_units_verify(short_tmp: Path) -> None:
    folder = installed(CONTRIB, short_tmp / "system", "/opt/taskd/bin")
    assert verify(folder) == ""


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_user_units_verify(short_tmp: Path) -> None:
    folder = installed(CONTRIB / "user", short_tmp / "user", "%h/.local/share/taskd/venv/bin")
    runtime = short_tmp / "runtime"
    runtime.mkdir(mode=0o700)
    assert verify(folder, "--user", env={"XDG_RUNTIME_DIR": str(runtime)}) == ""
