"""`make bench` cannot rot: every scenario runs at a tiny scale, for correctness only.

The drivers check their own work (every drained job succeeded); this checks that each row
of the tables got taskd's numbers and its floor's. The peers (huey, pgqueuer, procrastinate)
come with the `bench` extra and run in `make bench` only. Speed is never asserted here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.backends import postgres_url
from tests.bench import compare, disk_full, http_flood, quick_check
from tests.bench.compare import PEERS


def table(text: str) -> dict[str, list[str]]:
    rows = [line.split(" | ") for line in text.splitlines() if line[:2] == "| "]
    return {cells[0].strip("| "): [cell.strip("| ") for cell in cells] for cells in rows[1:]}


def test_every_benchmark_scenario_runs(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    compare.main(
        ["--repeat", "1", "--scale", "0.01", "--backlog", "20000", "--ticks", "2", "--runs", "1",
         "--startup-jobs", "20000", "--inspect-jobs", "20000", "--postgres", "", "--no-peers",
         "--output", str(output)]
    )  # fmt: skip
    rows = table(output.read_text())
    assert len(rows) >= 12, rows
    # Single enqueues and the drain next to the backlog, and the drain's CPU per job.
    assert sum("rate-limited jobs" in name and "(SQLite)" in name for name in rows) == 3, rows
    for name, cells in rows.items():
        assert cells[1] != "-", f"no taskd figure for {name}"
        if cells[2].startswith(PEERS):
            assert cells[3] == "-", f"a peer was measured without --peers: {name}"
        elif cells[2] != "-":
            assert cells[3] != "-", f"no figure for the floor of {name}"


def test_every_postgres_benchmark_scenario_runs(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    compare.main(
        ["--repeat", "1", "--scale", "0.01", "--postgres", postgres_url(), "--postgres-only",
         "--no-peers", "--output", str(output)]
    )  # fmt: skip
    text = output.read_text()
    limited = table(text[: text.index("## PostgreSQL")])  # next to a rate-limited backlog
    # Single enqueues and the drain next to the backlog, and the drain's CPU per job.
    assert [name.split(": ")[0].endswith("(PostgreSQL)") for name in limited] == [True] * 3, limited
    assert all(cells[1] != "-" and cells[3] != "-" for cells in limited.values()), limited
    rows = table(text[text.index("## PostgreSQL") :])
    # Five scenarios; each one's CPU per job of the daemons, each drain's of the server too.
    assert len(rows) == 12, rows
    for name, cells in rows.items():
        unit = " us" if "CPU per job" in name else " jobs/s"
        assert all(cell.endswith(unit) for cell in cells[1:3]), f"a figure missing: {name}"
        assert cells[3:5] == ["-", "-"], f"a peer was measured without --peers: {name}"


def test_the_quick_check_measurement_runs(capsys: pytest.CaptureFixture[str]) -> None:
    quick_check.main(["--jobs", "300", "--repeat", "1"])
    assert capsys.readouterr().out.count("quick_check, 300 jobs") == 2


@pytest.mark.skipif(os.getuid() != 0, reason="mounts a tmpfs: root only")
def test_the_disk_full_measurement_runs(capsys: pytest.CaptureFixture[str]) -> None:
    disk_full.main(["--size", "1m", "--freed", "128", "--spare", "256"])
    out = capsys.readouterr().out
    assert "jobs after freeing 128 KiB" in out and "  ready;" in out, out


def test_the_http_flood_measurement_runs(capsys: pytest.CaptureFixture[str]) -> None:
    http_flood.main(["--connections", "20", "--rate", "50", "--seconds", "0.5", "--probes", "2"])
    lines = [line.split(" | ") for line in capsys.readouterr().out.splitlines()]
    probes = [cells for cells in lines if cells[0] in ("| half-sent, 50/s", "| idle-token, 50/s")]
    assert len(probes) == 2 * 5, probes  # per flood: the first, two kinds, the flood, memory
    assert all("200" in cells[2] for cells in probes if "GET" in cells[1]), probes
