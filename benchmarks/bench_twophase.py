"""Cost of an effect across two databases against one database, on the same server.

    python benchmarks/bench_twophase.py [--dsn DSN] [--ops 300] [--rounds 5] [--json PATH]

T1  latency of one 2PC effect writing a 1-row INSERT to each of two databases
    (``MultiLedger(coordinator=a, {"a": a, "b": b}, protocol="2pc").run(key, fn)``, a fresh key
    per call) divided by the latency of one single-database effect writing the same two rows
    to one database (``Ledger(a).run(key, fn)``). Goal: median ratio <= 2.5.
T2  latency of the same effect with ``protocol="3pc"`` divided by 2PC (informational: the
    price of the pre-commit round).
For context, a bare transaction (``BEGIN; INSERT; INSERT; COMMIT``, psycopg) is measured too.
All sides run in one process, interleaved in rounds (the order rotates per round) so that
drift on the machine affects each alike; each side's figure is the median over all calls.

The script creates two databases ``eos_bench2pc_<random>_{a,b}`` through the admin DSN
(``--dsn``, else $EOS_BENCH_DSN, $EOS_TEST_DSN, else postgresql://postgres@127.0.0.1/postgres),
migrates the ledger into both, and drops them at the end. The server needs
max_prepared_transactions > 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402
from psycopg import conninfo, sql  # noqa: E402

from eos_airflow.api import Ledger  # noqa: E402
from eos_airflow.ledger.migrate import migrate  # noqa: E402
from eos_airflow.multiledger import MultiLedger  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1/postgres"
T1_GOAL = 2.5
SETTINGS = (
    "server_version",
    "synchronous_commit",
    "fsync",
    "wal_sync_method",
    "max_prepared_transactions",
)
INSERT = "INSERT INTO bench_rows (who, n) VALUES (%s, %s)"


def _admin(conn_str: str, name: str | None = None) -> str:
    return conninfo.make_conninfo(conn_str, dbname=name) if name else conn_str


def _create(admin: str, name: str) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = _admin(admin, name)
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_rows (who text, n bigint)")
    return dsn


def _drop(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _timed(fn: Callable[[int], Any], ops: int, start: int) -> list[float]:
    times = []
    for i in range(start, start + ops):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--ops", type=int, default=300, help="calls per side per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    admin = (
        args.dsn or os.environ.get("EOS_BENCH_DSN") or os.environ.get("EOS_TEST_DSN") or DEFAULT_DSN
    )
    token = secrets.token_hex(4)
    names = {n: f"eos_bench2pc_{token}_{n}" for n in ("a", "b")}
    try:
        dsns = {n: _create(admin, db) for n, db in names.items()}
        with psycopg.connect(dsns["a"]) as conn:
            settings = {
                s: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(s))).fetchone()[0]
                for s in SETTINGS
            }
        if settings["max_prepared_transactions"] == "0":
            sys.exit("bench_twophase: the server has max_prepared_transactions = 0")
        figures = _measure(dsns, args.ops, args.rounds)
    finally:
        for db in names.values():
            _drop(admin, db)
    _report(figures, settings, args)


def _measure(dsns: dict[str, str], ops: int, rounds: int) -> dict[str, list[float]]:
    bare = psycopg.connect(dsns["a"])
    single = Ledger(dsns["a"])
    two = MultiLedger(dsns["a"], dsns, protocol="2pc")
    three = MultiLedger(dsns["a"], dsns, protocol="3pc")

    def bare_tx(i: int) -> None:
        with bare.transaction():
            bare.execute(INSERT, ["bare", i])
            bare.execute(INSERT, ["bare", i])

    def local(i: int) -> None:
        def fn(eos: Any) -> dict[str, int]:
            eos.conn.execute(INSERT, ["local", i])
            eos.conn.execute(INSERT, ["local", i])
            return {"n": i}

        single.run(f"local/{i}", fn)

    def multi(ledger: MultiLedger, tag: str) -> Callable[[int], None]:
        def run(i: int) -> None:
            def fn(eos: Any) -> dict[str, int]:
                eos.conns["a"].execute(INSERT, [tag, i])
                eos.conns["b"].execute(INSERT, [tag, i])
                return {"n": i}

            ledger.run(f"{tag}/{i}", fn)

        return run

    sides: dict[str, Callable[[int], Any]] = {
        "bare": bare_tx,
        "local": local,
        "2pc": multi(two, "2pc"),
        "3pc": multi(three, "3pc"),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():  # warm up: connections, pools, plans
        _timed(fn, 20, 10_000_000)
    order = list(sides)
    for round_ in range(rounds):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            times[name] += _timed(sides[name], ops, round_ * ops)
    bare.close()
    single.close()
    two.close()
    three.close()
    return times


def _report(
    times: dict[str, list[float]], settings: dict[str, str], args: argparse.Namespace
) -> None:
    median = {name: statistics.median(t) * 1000 for name, t in times.items()}
    p95 = {name: statistics.quantiles(t, n=20)[-1] * 1000 for name, t in times.items()}
    t1 = median["2pc"] / median["local"]
    t2 = median["3pc"] / median["2pc"]
    print(
        f"server: PostgreSQL {settings['server_version']}, synchronous_commit="
        f"{settings['synchronous_commit']}, fsync={settings['fsync']}, wal_sync_method="
        f"{settings['wal_sync_method']}; Python {platform.python_version()}; "
        f"{len(times['local'])} calls per side"
    )
    print(f"{'side':<8}{'median ms':>12}{'p95 ms':>10}")
    for name in times:
        print(f"{name:<8}{median[name]:>12.3f}{p95[name]:>10.3f}")
    print(
        f"T1 2PC (2 databases) / single-database effect: {t1:.2f} (goal <= {T1_GOAL}: "
        f"{'met' if t1 <= T1_GOAL else 'not met'})"
    )
    print(f"T2 3PC / 2PC: {t2:.2f}")
    print(f"single-database effect / bare transaction: {median['local'] / median['bare']:.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"median_ms": median, "p95_ms": p95, "t1": t1, "t2": t2, "settings": settings},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
