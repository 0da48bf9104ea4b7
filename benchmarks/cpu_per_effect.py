"""Client CPU per effect: ``time.process_time`` over 5 x 600 one-row effects of ``Ledger.run``.

The gateway's cost is client-side Python (the SQL it sends is the same), so this compares two
checkouts directly: run it with each on ``PYTHONPATH``, interleaved::

    PYTHONPATH=/path/to/checkout .venv/bin/python benchmarks/cpu_per_effect.py TAG [--dsn DSN]

Prints ``TAG cpu_us/effect median N wall_us M``. The admin DSN (default ``EOS_TEST_DSN`` or the
local server) creates and drops a scratch database.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import psycopg
from psycopg import conninfo, sql

from eos_airflow import Ledger, Origin
from eos_airflow.ledger.migrate import migrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tag")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("EOS_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()
    name = "eos_cpu_" + uuid.uuid4().hex[:8]
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = conninfo.make_conninfo(args.dsn, dbname=name)
    try:
        migrate(lambda: psycopg.connect(dsn), "eos")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (k text PRIMARY KEY)")
        origin = Origin("d", "t", "r", -1)

        def write(eos):
            eos.conn.execute("INSERT INTO t VALUES (%s)", [eos.key])
            return 1

        with Ledger(dsn) as ledger:
            for i in range(300):  # warm-up: the hot path's statements get prepared
                ledger.run(f"w{i}", write, origin=origin)
            cpu, wall = [], []
            for r in range(5):
                c0, w0 = time.process_time(), time.perf_counter()
                for i in range(600):
                    ledger.run(f"k{r}-{i}", write, origin=origin)
                cpu.append((time.process_time() - c0) / 600 * 1e6)
                wall.append((time.perf_counter() - w0) / 600 * 1e6)
        print(
            f"{args.tag} cpu_us/effect median {statistics.median(cpu):.1f} "
            f"wall_us {statistics.median(wall):.1f}"
        )
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
