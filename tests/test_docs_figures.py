"""The crash matrix figures of docs/reliability.md are the counts its run printed; the
lakehouse figures of docs/performance.md are its recorded run's raw results.

The slow tier's printed lines are committed unedited in docs/results/crash-matrix.txt; the
table's runs, duplicates, losses and prepared-left columns, and the totals of "Where the
numbers come from", must be those lines' counts (a figure typed by hand cannot drift).
"""

from __future__ import annotations

import json
import re
import sys

from tests.conftest import ROOT

DOC = ROOT / "docs" / "reliability.md"
RESULTS = ROOT / "docs" / "results" / "crash-matrix.txt"
LINE = re.compile(
    r"^crash matrix (\S+) \(EOS_FAULT_SEED=\d+\): (\d+) runs, (\d+) faults fired, "
    r"(\d+) keys, (\d+) duplicates, (\d+) lost, (\d+) prepared left",
    re.M,
)


def printed() -> dict[str, dict[str, int]]:
    found = {
        m[1]: dict(
            zip(
                ("runs", "fired", "keys", "duplicates", "lost", "prepared"),
                map(int, m.groups()[1:]),
                strict=True,
            )
        )
        for m in LINE.finditer(RESULTS.read_text())
    }
    assert len(found) == 12, found
    assert re.search(r"^12 passed", RESULTS.read_text(), re.M), "the recorded run did not pass"
    return found


def number(cell: str) -> int | None:
    cell = cell.strip()
    return None if cell.startswith("–") else int(cell.split()[0].replace(",", ""))


def test_the_crash_matrix_table_is_the_printed_counts():
    counts = printed()
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.search(r"test_crash_matrix\[([\w-]+)\]", line)
        if line.startswith("| crash matrix") and match:
            cells = line.split("|")[1:-1]
            rows[match[1]] = [number(c) for c in cells[1:5]]
    assert set(rows) == set(counts)
    for name, (runs, duplicates, losses, prepared) in rows.items():
        got = counts[name]
        assert runs == got["runs"] == got["fired"], (name, runs, got)
        assert (duplicates, losses) == (got["duplicates"], got["lost"]), (name, got)
        assert prepared in (None, got["prepared"]), (name, prepared, got)


def test_the_totals_are_the_sums_of_the_printed_counts():
    counts = printed()
    text = " ".join(DOC.read_text().split())
    total = {k: sum(c[k] for c in counts.values()) for k in ("runs", "fired", "keys")}
    assert (
        f"{total['runs']:,} runs, {total['fired']:,} faults fired, {total['keys']:,} keys" in text
    ), total


LAKE_DOC = ROOT / "docs" / "performance.md"
LAKE_RESULTS = ROOT / "docs" / "results" / "lakehouse-bench.json"


def test_the_lakehouse_section_is_rendered_from_the_recorded_raw_results():
    """docs/results/lakehouse-bench.json holds every write's seconds as
    benchmarks/bench_lakehouse.py measured them; the section of docs/performance.md between
    its markers (table: medians, ratios, goals) is exactly what the script renders from it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_lakehouse

    results = json.loads(LAKE_RESULTS.read_text())
    for fmt in bench_lakehouse.FORMATS:
        for backend in bench_lakehouse.BACKENDS:
            runs = results["raw"][fmt][backend]
            assert max(r["rows"] for r in runs) == 1_000_000, (fmt, backend)
            for run in runs:
                assert len(run["baseline_s"]) == len(run["eos_s"]) == run["rounds"] >= 5
                want = run["rows"] * (run["rounds"] + 1)  # the unmeasured first write too
                assert run["rows_counted"] == {"baseline": want, "eos": want}, run
    text = LAKE_DOC.read_text()
    section = re.search(
        re.escape(bench_lakehouse.BEGIN_MARK) + ".*?" + re.escape(bench_lakehouse.END_MARK),
        text,
        re.S,
    )
    assert section, "docs/performance.md has no lakehouse section"
    assert section[0] == bench_lakehouse.render(results, "img")
    assert (ROOT / "docs" / "img" / bench_lakehouse.PLOT).read_bytes()[:4] == b"\x89PNG"
