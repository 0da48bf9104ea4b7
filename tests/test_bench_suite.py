"""Smoke run of the benchmark suite (benchmarks/run_all.py --quick) on the test server.

The figures of a quick run mean nothing; what is checked is what a user of ``./dev bench``
relies on: the table with every asked-for figure and its baseline, the plots, the raw JSON,
the docs section rewritten between its markers (and nothing outside them), the scratch
databases dropped, and a clear error for an unknown part.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"

DOC = """# Performance

Text before the section.

<!-- bench:begin -->
old figures
<!-- bench:end -->

Text after the section.
"""


def scratch_databases(admin: str, pattern: str) -> list[str]:
    with psycopg.connect(admin, autocommit=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", [pattern]
            )
        ]


def run_all(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN_ALL), *argv], capture_output=True, text=True, timeout=timeout
    )


def table_rows(stdout: str) -> dict[str, str]:
    """The table's rows that carry a figure id (the table ends at the first blank line;
    Airflow's trigger code may log to stdout before it)."""
    start = stdout.index("figure  ")
    table = stdout[start:].split("\n\n")[0].splitlines()
    assert table[0].split()[:3] == ["figure", "measured", "baseline"], table[0]
    return {line.split()[0]: line for line in table[2:] if line[:1] == "P"}


def test_quick_run_prints_the_table_writes_plots_and_rewrites_only_its_section(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text(DOC)
    img = tmp_path / "img"
    raw = tmp_path / "raw.json"
    done = run_all(
        "--quick",
        "--only",
        "P1,P2",
        "--dsn",
        pg_admin_dsn,
        "--docs",
        str(doc),
        "--img-dir",
        str(img),
        "--json",
        str(raw),
    )
    assert done.returncode == 0, done.stderr[-3000:]

    rows = table_rows(done.stdout)
    assert set(rows) == {"P1", "P2"}, done.stdout
    assert "bare INSERT+COMMIT" in rows["P1"] and "<= 1.3" in rows["P1"]
    assert "bare tx" in rows["P2"] and ">= 0.8" in rows["P2"]

    results = json.loads(raw.read_text())
    figures = {f["id"]: f for f in results["figures"] if f["id"]}
    # the printed figures parse, and agree with the raw results: the baseline ran (measured
    # in the same run), the ratio is value / baseline, and "met?" follows the goal
    p1 = re.search(
        r"bare INSERT\+COMMIT ([\d.]+) ms\s+([\d.]+) ms\s+([\d.]+)\s+<= 1\.3\s+"
        r"(yes|NO)\b",
        rows["P1"],
    )
    p2 = re.search(r"bare tx ([\d,]+)/s\s+([\d,]+)/s\s+([\d.]+)\s+>= 0\.8\s+(yes|NO)\b", rows["P2"])
    assert p1 and p2, (rows["P1"], rows["P2"])
    for match, fid, met in ((p1, "P1", lambda r: r <= 1.3), (p2, "P2", lambda r: r >= 0.8)):
        baseline, value, ratio = (float(match.group(i).replace(",", "")) for i in (1, 2, 3))
        assert baseline > 0 and value > 0, match.group(0)
        assert ratio == pytest.approx(figures[fid]["ratio"], abs=0.006), (
            match.group(0),
            figures[fid],
        )
        assert figures[fid]["met"] is met(figures[fid]["ratio"])
        assert match.group(4) == ("yes" if figures[fid]["met"] else "NO")
    p1_runs = results["p1"]
    assert p1_runs and all(r["bare_median_ms"] > 0 and r["eos_median_ms"] > 0 for r in p1_runs)
    assert figures["P1"]["ratio"] == pytest.approx(
        statistics.median(r["eos_median_ms"] / r["bare_median_ms"] for r in p1_runs)
    )
    p2_runs = results["p2"]["4"]
    assert p2_runs and all(r["bare_ops_s"] > 0 and r["eos_ops_s"] > 0 for r in p2_runs)
    assert figures["P2"]["ratio"] == pytest.approx(
        statistics.fmean(r["eos_ops_s"] for r in p2_runs)
        / statistics.fmean(r["bare_ops_s"] for r in p2_runs)
    )
    assert sorted(results["rows_per_effect"]) == ["1", "10", "100"]
    assert sorted(results["p2"]) == ["1", "4"]

    plots = sorted(p.name for p in img.iterdir())
    assert plots == ["bench_rows.png", "bench_writers.png"]
    assert all((img / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    text = doc.read_text()
    assert text.startswith("# Performance\n\nText before the section.\n\n<!-- bench:begin -->")
    assert text.endswith("<!-- bench:end -->\n\nText after the section.\n")
    assert "old figures" not in text
    section = text.split("<!-- bench:begin -->")[1].split("<!-- bench:end -->")[0]
    assert "`python benchmarks/run_all.py --quick --only P1,P2 --dsn" in section
    assert "| P1 | effect latency" in section and "| P2 | effects/s, 4 writers" in section
    assert "![Throughput and P2 ratio against concurrent writers](img/bench_writers.png)" in section
    assert scratch_databases(pg_admin_dsn, f"eos_bench_%_{results['scratch_token']}") == []


@pytest.mark.slow
def test_quick_run_of_the_other_parts(pg_admin_dsn: str, tmp_path: Path) -> None:
    """P3-P6 at tiny sizes (P7 starts Airflow, P8 needs the Prefect virtualenv: not here)."""
    raw = tmp_path / "raw.json"
    done = run_all(
        "--quick",
        "--only",
        "P3,P4,P5,P6",
        "--dsn",
        pg_admin_dsn,
        "--no-docs",
        "--img-dir",
        str(tmp_path / "img"),
        "--json",
        str(raw),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(table_rows(done.stdout)) == {"P3", "P4", "P5", "P6"}, done.stdout
    results = json.loads(raw.read_text())
    assert [s["ledger_rows"] for s in results["p5"]] == [0, 5000]
    assert results["gc"]["events"] == 1000
    assert results["p6"]["connections"] <= 2
    assert (tmp_path / "img" / "bench_ledger_size.png").exists()
    assert scratch_databases(pg_admin_dsn, f"eos_bench_%_{results['scratch_token']}") == []


def test_an_unknown_part_is_refused_with_the_list_of_parts(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    done = run_all(
        "--quick",
        "--only",
        "P1,P11",
        "--dsn",
        pg_admin_dsn,
        "--docs",
        str(tmp_path / "never.md"),
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown part(s) P11; choose from P1, P2, P3, P4, P5, P6, P7, P8, P9, P10" in done.stderr
    assert not (tmp_path / "never.md").exists()


def test_quick_run_of_the_lakehouse_parts_at_a_bounded_size(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    """P9 (Iceberg) and P10 (Delta) at 1,000 rows on file:// and the local S3 API: a goal
    row per format and storage, each against its plain-library baseline, the rows written
    counted, the plot written and the scratch databases dropped."""
    raw = tmp_path / "raw.json"
    done = run_all(
        "--quick",
        "--only",
        "P9,P10",
        "--lake-max-rows",
        "1000",
        "--dsn",
        pg_admin_dsn,
        "--no-docs",
        "--img-dir",
        str(tmp_path / "img"),
        "--json",
        str(raw),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("figure  ") :].split("\n\n")[0].splitlines()
    goal_rows = [line for line in table[2:] if line.split()[0] in ("P9", "P10")]
    assert len(goal_rows) == 4, done.stdout
    for line in goal_rows:
        part, fmt = line.split()[:2]
        assert (part, fmt) in (("P9", "iceberg"), ("P10", "delta")), line
        assert "<= 1.05" in line and re.search(r"\b(yes|NO)\b", line), line
        baseline = "plain pyiceberg SqlCatalog append" if fmt == "iceberg" else "write_deltalake"
        assert baseline in line, line
    storages = sorted(re.search(r" on (\w+), median", line)[1] for line in goal_rows)
    assert storages == ["file", "file", "s3", "s3"], goal_rows

    results = json.loads(raw.read_text())
    lake = results["lakehouse"]
    for fmt in ("iceberg", "delta"):
        for backend in ("file", "s3"):
            (run,) = lake[fmt][backend]
            assert run["rows"] == 1000 and run["rounds"] == 1
            assert run["rows_counted"] == {"baseline": 2000, "eos": 2000}
            assert len(run["baseline_s"]) == len(run["eos_s"]) == 1
            assert run["baseline_s"][0] > 0 and run["eos_s"][0] > 0
    figures = [f for f in results["figures"] if f["id"]]
    assert {(f["id"], f["part"]) for f in figures} == {("P9", "P9"), ("P10", "P10")}
    for f in figures:
        fmt = "iceberg" if f["id"] == "P9" else "delta"
        backend = "s3" if " on s3," in f["what"] else "file"
        run = lake[fmt][backend][0]
        assert f["ratio"] == pytest.approx(run["eos_s"][0] / run["baseline_s"][0])
        assert f["met"] is (f["ratio"] <= 1.05)
    assert (tmp_path / "img" / "bench_lakehouse_suite.png").read_bytes()[:4] == b"\x89PNG"
    assert scratch_databases(pg_admin_dsn, f"eos_bench_%_{results['scratch_token']}") == []
