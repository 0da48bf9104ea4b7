"""The crash matrix figures of docs/reliability.md are the counts its run printed.

The slow tier's printed lines are committed unedited in docs/results/crash-matrix.txt; the
table's runs, duplicates, losses and prepared-left columns, and the totals of "Where the
numbers come from", must be those lines' counts (a figure typed by hand cannot drift).
"""

from __future__ import annotations

import re

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
    assert len(found) == 8, found
    assert re.search(r"^8 passed", RESULTS.read_text(), re.M), "the recorded run did not pass"
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
