"""Cost of an Iceberg append committed with an effect (``eos.iceberg``) against pyiceberg's
own SQL catalog appending to the same table.

    python benchmarks/bench_iceberg.py [--dsn DSN] [--ops 30] [--rows 100] [--writers 4]
                                       [--json PATH]

I1  latency of one append of ``--rows`` rows: ``Ledger.run(key, fn)`` whose function opens
    the table with ``eos.iceberg("bench.t")`` and appends (a fresh key per call), divided by
    the latency of the same append through a stock ``SqlCatalog("eos", ...)`` opened once
    (``catalog.load_table("bench.t").append(...)``). Interleaved, the order alternating.
I2  what opening costs: an effect that only calls ``eos.iceberg("bench.t")`` against an
    effect that does nothing.
I3  ``--writers`` threads appending ``--ops`` times each to one table, through effects and
    through stock catalogs (one per thread): appends/s. Both sides retry lost swaps
    (pyiceberg's commit retries, 4 by default, with backoff); an effect holds the table's
    pointer from its swap until it commits, so the others wait instead of failing. Reports
    the appends that landed per second and the ones that failed; each side writes a table
    of its own, empty at the start.

The script creates a database ``eos_bench_<random>`` through the admin DSN (``--dsn``, else
$EOS_BENCH_DSN, $EOS_TEST_DSN, else postgresql://postgres@127.0.0.1/postgres), a warehouse in
a temporary directory, and drops both at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402
import pyarrow as pa  # noqa: E402
from psycopg import conninfo, sql  # noqa: E402
from pyiceberg.catalog.sql import SqlCatalog  # noqa: E402

from eos_airflow import Ledger  # noqa: E402
from eos_airflow.ledger.migrate import migrate  # noqa: E402
from eos_airflow.protocol.iceberg import reader_uri  # noqa: E402

SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("payload", pa.string())])


def _rows(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {"id": list(range(start, start + n)), "payload": [f"row {i}" for i in range(n)]},
        schema=SCHEMA,
    )


def _ms(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "median_ms": round(statistics.median(values) * 1000, 2),
        "p90_ms": round(values[int(0.9 * (len(values) - 1))] * 1000, 2),
    }


def run(dsn: str, warehouse: str, ops: int, nrows: int, writers: int) -> dict[str, Any]:
    ledger = Ledger(dsn)
    data = _rows(nrows)
    ledger.run(
        "bench/create",
        lambda eos: bool(eos.iceberg("bench.t", schema=SCHEMA, warehouse=warehouse)),
    )
    stock = SqlCatalog("eos", uri=reader_uri(dsn), warehouse=warehouse)
    counter = iter(range(10**9))

    def eos_append() -> float:
        def fn(eos: Any) -> None:
            eos.iceberg("bench.t").append(data)

        start = time.perf_counter()
        ledger.run(f"bench/append/{next(counter)}", fn)
        return time.perf_counter() - start

    def stock_append() -> float:
        start = time.perf_counter()
        stock.load_table("bench.t").append(data)
        return time.perf_counter() - start

    def eos_open() -> float:
        start = time.perf_counter()
        ledger.run(f"bench/open/{next(counter)}", lambda eos: bool(eos.iceberg("bench.t")))
        return time.perf_counter() - start

    def eos_empty() -> float:
        start = time.perf_counter()
        ledger.run(f"bench/empty/{next(counter)}", lambda eos: None)
        return time.perf_counter() - start

    for warm in (eos_append, stock_append, eos_open, eos_empty):
        warm()
    i1: dict[str, list[float]] = {"eos": [], "stock": []}
    i2: dict[str, list[float]] = {"open": [], "empty": []}
    for n in range(ops):
        pairs = [("eos", eos_append), ("stock", stock_append)]
        for name, fn in pairs if n % 2 == 0 else pairs[::-1]:
            i1[name].append(fn())
        opens = [("open", eos_open), ("empty", eos_empty)]
        for name, fn in opens if n % 2 == 0 else opens[::-1]:
            i2[name].append(fn())

    def concurrent(side: str) -> dict[str, float]:
        name = f"bench.c_{side}"  # a table of its own: both sides start from an empty one
        ledger.run(
            f"bench/create/{side}",
            lambda eos: bool(eos.iceberg(name, schema=SCHEMA, warehouse=warehouse)),
        )
        barrier = threading.Barrier(writers)
        landed: list[int] = []
        failed: list[str] = []

        def writer(w: int) -> None:
            catalog = (
                SqlCatalog("eos", uri=reader_uri(dsn), warehouse=warehouse)
                if side == "stock"
                else None
            )
            barrier.wait()
            for k in range(ops):
                try:
                    if catalog is not None:
                        catalog.load_table(name).append(data)
                    else:
                        ledger.run(f"bench/c/{w}/{k}", lambda eos: eos.iceberg(name).append(data))
                    landed.append(1)
                except Exception as exc:  # noqa: BLE001 - counted
                    failed.append(type(exc).__name__)
            if catalog is not None:
                catalog.close()

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        return {
            "landed_per_s": round(len(landed) / elapsed, 1),
            "landed": len(landed),
            "failed": len(failed),
            "errors": sorted(set(failed)),
        }

    i3 = {"stock": concurrent("stock"), "eos": concurrent("eos")}
    counted = {
        "I1": stock.load_table("bench.t").scan().to_arrow().num_rows,
        **{side: stock.load_table(f"bench.c_{side}").scan().to_arrow().num_rows for side in i3},
    }
    expected = {  # the warm-ups and I1; what I3 says landed
        "I1": (2 + 2 * ops) * nrows,
        **{side: i3[side]["landed"] * nrows for side in i3},
    }
    stock.close()
    ledger.close()
    return {
        "I1": {
            "eos": _ms(i1["eos"]),
            "stock": _ms(i1["stock"]),
            "ratio": round(statistics.median(i1["eos"]) / statistics.median(i1["stock"]), 2),
        },
        "I2": {"open": _ms(i2["open"]), "empty": _ms(i2["empty"])},
        "I3": {"writers": writers, "appends_per_writer": ops, **i3},
        "rows_expected": expected,
        "rows_counted": counted,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=None, help="admin DSN (creates and drops a database)")
    ap.add_argument("--ops", type=int, default=30, help="appends per side (default 30)")
    ap.add_argument("--rows", type=int, default=100, help="rows per append (default 100)")
    ap.add_argument("--writers", type=int, default=4, help="I3 threads (default 4)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    admin = (
        args.dsn
        or os.environ.get("EOS_BENCH_DSN")
        or os.environ.get("EOS_TEST_DSN")
        or "postgresql://postgres@127.0.0.1/postgres"
    )
    name = f"eos_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = conninfo.make_conninfo(admin, dbname=name)
    try:
        migrate(dsn)
        with tempfile.TemporaryDirectory(prefix="eos-bench-lake-") as lake:
            figures = run(dsn, Path(lake).as_uri(), args.ops, args.rows, args.writers)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if figures["rows_expected"] == figures["rows_counted"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
