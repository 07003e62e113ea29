"""`make bench` cannot rot: every scenario runs at a tiny scale, for correctness only.

The drivers check their own work (every drained job succeeded, every huey result stored);
this checks that each row of the table got its numbers. Speed is never asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench import compare, quick_check


def test_every_benchmark_scenario_runs(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    compare.main(
        ["--repeat", "1", "--scale", "0.01", "--backlog", "20000", "--ticks", "2", "--runs", "1",
         "--output", str(output)]
    )  # fmt: skip
    rows = [line.split(" | ") for line in output.read_text().splitlines() if line[:2] == "| "]
    table = {cells[0].strip("| "): cells for cells in rows[1:]}
    assert len(table) >= 12, table
    for name, cells in table.items():
        assert cells[1] != "-", f"no taskd figure for {name}"
        if cells[2] != "-":
            assert cells[3] != "-", f"no figure for the peer of {name}"


def test_the_quick_check_measurement_runs(capsys: pytest.CaptureFixture[str]) -> None:
    quick_check.main(["--jobs", "300", "--repeat", "1"])
    assert capsys.readouterr().out.count("quick_check, 300 jobs") == 2
