"""1,000 deferred LedgerSensors in one triggerer-like process: connections and wake-up delay.

    python benchmarks/bench_sensors.py [--dsn DSN] [--triggers 1000] [--commits 200]
                                       [--interval 0.02]

Runs ``--triggers`` ``LedgerTrigger.run()`` coroutines in one asyncio event loop, as the
Airflow triggerer does (each waits for its own key, fallback poll one hour away so only
NOTIFY can wake them), then counts the database connections they hold
(``pg_stat_activity`` rows with the watcher's application_name) and commits ``--commits`` of
the keys, one every ``--interval`` seconds, from a thread through ``eos_airflow.Ledger``.
The delay of a key is the time from the return of its commit to the moment its trigger
yields its event. Goals: connections <= 2, p95 delay <= 1 s.

Creates a database ``eos_bench_<random>`` through the admin DSN (``--dsn``, else
$EOS_BENCH_DSN, $EOS_TEST_DSN, else postgresql://postgres@127.0.0.1/postgres), migrates the
ledger into it, and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402
from psycopg import conninfo, sql  # noqa: E402

from eos_airflow.api import Ledger  # noqa: E402
from eos_airflow.ledger.migrate import migrate  # noqa: E402
from eos_airflow.ledger.watch import APPLICATION_NAME  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1/postgres"
CONN_ID = "eos_bench"


def airflow_conn(dsn: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    return json.dumps(
        {
            "conn_type": "postgres",
            "host": params.get("host", "127.0.0.1"),
            "port": int(params.get("port", 5432)),
            "login": params.get("user", "postgres"),
            "password": params.get("password"),
            "schema": params["dbname"],
        }
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def bench(dsn: str, n_triggers: int, n_commits: int, interval: float) -> dict:
    from eos_airflow.triggers.ledger import LedgerTrigger

    keys = [f"bench/{i:05d}" for i in range(n_triggers)]
    woken: dict[str, float] = {}

    async def run(key: str) -> None:
        trigger = LedgerTrigger(conn_id=CONN_ID, keys=[key], poll_interval=3600.0)
        async for event in trigger.run():
            assert event.payload["status"] == "committed", event.payload
            woken[key] = time.monotonic()

    started = time.monotonic()
    tasks = [asyncio.ensure_future(run(k)) for k in keys]
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM eos.waiters").fetchone()[0] < n_triggers:
            await asyncio.sleep(0.05)
        registered = time.monotonic() - started
        connections = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND datname = current_database()",
            [APPLICATION_NAME],
        ).fetchone()[0]

    committed: dict[str, float] = {}

    def committer() -> None:
        with Ledger(dsn) as ledger:
            for key in keys[:n_commits]:
                ledger.run(key, lambda eos: {"ok": True})
                committed[key] = time.monotonic()
                time.sleep(interval)

    thread = threading.Thread(target=committer)
    thread.start()
    await asyncio.to_thread(thread.join)
    await asyncio.wait_for(asyncio.gather(*tasks[:n_commits]), 60)
    for task in tasks[n_commits:]:
        task.cancel()
    await asyncio.gather(*tasks[n_commits:], return_exceptions=True)
    delays = [max(0.0, woken[k] - committed[k]) for k in keys[:n_commits]]
    return {
        "triggers": n_triggers,
        "registered_s": registered,
        "connections": connections,
        "commits": n_commits,
        "p50_ms": statistics.median(delays) * 1000,
        "p95_ms": percentile(delays, 0.95) * 1000,
        "max_ms": max(delays) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("EOS_BENCH_DSN") or os.environ.get("EOS_TEST_DSN") or DEFAULT_DSN,
    )
    parser.add_argument("--triggers", type=int, default=1000)
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between two commits")
    args = parser.parse_args()
    name = f"eos_bench_{secrets.token_hex(4)}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = conninfo.make_conninfo(args.dsn, dbname=name)
    try:
        migrate(dsn)
        os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = airflow_conn(dsn)
        result = asyncio.run(bench(dsn, args.triggers, args.commits, args.interval))
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    print(
        f"| deferred sensors | registered in | DB connections (goal <= 2) | commits "
        f"| wake-up p50 | p95 (goal <= 1 s) | max |\n|---|---|---|---|---|---|---|\n"
        f"| {result['triggers']:,} | {result['registered_s']:.2f} s | {result['connections']} "
        f"| {result['commits']} | {result['p50_ms']:.1f} ms | {result['p95_ms']:.1f} ms "
        f"| {result['max_ms']:.1f} ms |"
    )
    ok = result["connections"] <= 2 and result["p95_ms"] <= 1000
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
