"""``eos-airflow outbox status | relay`` as subprocesses against PostgreSQL and NATS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psycopg

from tests.conftest import ROOT
from tests.messaging.conftest import NATS_URL, nats_received


def cli(*argv: str, **kwargs) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EOS_LEDGER_DSN", "EOS_FAILPOINTS")}
    return subprocess.Popen(
        [sys.executable, "-m", "eos_airflow.cli.main", *argv],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def run(*argv: str) -> tuple[int, str, str]:
    proc = cli(*argv)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def publish(ledger, key: str, subject: str, n: int) -> None:
    ledger.run(key, lambda eos: [eos.publish(f"nats:{subject}", {"i": i}) for i in range(n)] and {})


def test_status_relay_once_and_relay_service(ledger, db, nats_stream):
    stream, prefix = nats_stream
    publish(ledger, "cli/1", f"{prefix}.cli", 3)
    code, out, err = run("outbox", "status", "--dsn", db, "--format", "json")
    assert code == 0, err
    pending = json.loads(out)["pending"]
    assert [(p["destination"], p["pending"]) for p in pending] == [(f"nats:{prefix}.cli", 3)]

    code, out, err = run(
        "outbox",
        "relay",
        "--once",
        "--dsn",
        db,
        "--nats-url",
        NATS_URL,
        "--relay-id",
        "cli-test",
        "--format",
        "json",
    )
    assert code == 0, err
    assert json.loads(out) == {
        "relay_id": "cli-test",
        "delivered": 3,
        "duplicates": 0,
        "batches": 1,
        "by_destination": {f"nats:{prefix}.cli": 3},
    }

    service = cli(
        "outbox",
        "relay",
        "--dsn",
        db,
        "--nats-url",
        NATS_URL,
        "--poll-interval",
        "0.1",
        "--format",
        "json",
    )
    try:
        publish(ledger, "cli/2", f"{prefix}.cli", 2)
        deadline = time.monotonic() + 20
        with psycopg.connect(db, autocommit=True) as conn:
            while (
                conn.execute(
                    "SELECT count(*) FROM eos.outbox WHERE delivered_at IS NULL"
                ).fetchone()
                != (0,)
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
    finally:
        service.send_signal(signal.SIGTERM)
        out, err = service.communicate(timeout=30)
    assert service.returncode == 0, err
    assert json.loads(out)["delivered"] == 2
    assert len(nats_received(stream, f"{prefix}.>")) == 5


def test_relay_without_a_broker_is_a_usage_error(db):
    code, out, err = run("outbox", "relay", "--once", "--dsn", db)
    assert code == 2
    assert "no broker given: pass --nats-url and/or --kafka-config" in err
    code, out, err = run("outbox", "relay", "--once", "--dsn", db, "--kafka-config", "{oops")
    assert code == 2 and "--kafka-config is not JSON" in err
