"""The README's demo (``./dev demo`` = ``eos-airflow demo``) end to end, as on a fresh machine.

No database is configured (the demo starts its embedded PostgreSQL), the workdir is new,
Kafka is the mock cluster the demo starts itself and NATS is switched off
(``EOS_DEMO_NATS_URL=""``): the IoT example must then send its alerts to Kafka only. The
demo checks each example itself (rows against the source, broker contents, balances,
prepared transactions, ledger events) and exits 1 if one check fails; this test asserts
its exit code and the lines that report those checks. Takes 3-5 minutes (about 14 runs of
``airflow dags test``), hence the slow tier.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.airflow]

EOS_AIRFLOW = str(Path(sys.executable).parent / "eos-airflow")


def test_demo_runs_the_sales_scenarios_and_the_example_uses(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EOS_", "AIRFLOW_", "AIRFLOW__"))
    }
    env.update({"EOS_DEMO_NATS_URL": "", "COLUMNS": "240"})  # wide: one line per message
    done = subprocess.run(
        [EOS_AIRFLOW, "demo", "--workdir", str(tmp_path / "demo")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = done.stdout
    assert done.returncode == 0, out[-6000:] + done.stderr[-3000:]
    assert "✗" not in out, out[-6000:]

    # the sales scenarios, as before: the plain twin duplicated two days, the ledger none
    assert "starting an embedded PostgreSQL" in out
    assert out.count("process killed (exit 137)") == 3  # two sales runs, one bank transfer
    for day, plain in (("2024-01-01", 6), ("2024-01-02", 3), ("2024-01-03", 6)):
        assert re.search(rf"{day}\s*│\s*{plain}\s*│\s*3\s*│\s*1\s*│", out), out
    assert "Without the ledger the same failures wrote 6 duplicate rows." in out
    assert re.search(r"Audit trail: \d+ hash-chained events, intact\.", out)

    # analytics: resumed after the two committed chunks; the re-run replaced the day
    assert (
        "try 2 resumed after 100,000 committed rows; 120,000 events in the warehouse "
        "(120,000 in the source)"
    ) in out
    assert (
        "the day was replaced (ledger version 2): 2,025 orders, 120,000 events — not "
        "4,025 / 240,000"
    ) in out

    # IoT: no NATS, so Kafka only; every reading once, every alert delivered once
    assert "to Kafka only (EOS_DEMO_NATS_URL is empty)" in out
    assert (
        "600 rows = the 600 produced readings; ledger: claimed → failed → claimed → "
        "offsets → committed → skipped; alerts delivered once each: Kafka 117 of 117"
    ) in out

    # finance: killed after the decision, recovered, nothing moved twice
    assert "left in doubt: 2 prepared transactions (balances still 1000 / 1000" in out
    assert (
        "balances 975 / 1025: moved 25 once, total 2000 unchanged, 0 prepared transactions left"
    ) in out

    # lakehouse: both crashed loads landed once; the re-run replaced the day
    assert "Iceberg: 2,000 rows of the day in 1 snapshot; Delta: 2,000 rows in 1 write" in out
    assert "Iceberg: 2,000 rows in 2 snapshots; Delta: 2,000 rows after 2 writes" in out

    # the summary: every example's checks passed
    summary = out[out.index("what happened, and what the ledger prevented") :]
    assert len(re.findall(r"│ ok\s*│", summary)) == 4, summary
