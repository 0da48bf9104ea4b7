"""Speed of the audit tools on a big ledger: `ledger verify`, `ledger export`,
`ledger heads` and `ledger gc`, in events per second.

    python benchmarks/bench_audit.py [--dsn DSN] [--events 1000000] [--per-key 10]

The ledger is generated in the database in one statement: a recursive query walks every
key's chain level by level and computes each event's hash with the ledger's own
``event_hash`` function (claimed, committed, then skipped events, as real re-runs leave
them), and one more statement writes the ledger rows with their chain heads. The result
verifies like a ledger written by the protocol (the script checks that first).

Baseline: reading the same rows (the verify query, in chain order) with a binary COPY into
this process and doing nothing with them -- what any reader of the trail pays. Each figure
is printed with its ratio to the baseline; the median of ``--rounds`` runs counts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import secrets
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402
from psycopg import conninfo, sql  # noqa: E402

from eos_airflow.cli.main import main as cli  # noqa: E402
from eos_airflow.ledger import chain  # noqa: E402
from eos_airflow.ledger.gc import gc  # noqa: E402
from eos_airflow.ledger.migrate import migrate  # noqa: E402
from eos_airflow.ledger.queries import query  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

GENERATE = """
INSERT INTO eos.ledger_events (key, seq, event, attempt, at, detail, prev_hash, hash)
WITH RECURSIVE ev (key, seq, event, attempt, at, detail, prev_hash, hash) AS (
    SELECT k.key, 1::bigint, 'claimed'::eos.event_kind, 1, k.at, k.detail, k.genesis,
           eos.event_hash(k.genesis, k.key, 1, 'claimed', 1, k.at, k.detail)
    FROM (SELECT 'bench/' || lpad(g::text, 8, '0') AS key,
                 timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second' AS at,
                 jsonb_build_object('dag_id', 'bench', 'task_id', 'load',
                                    'run_id', 'scheduled__' || g, 'map_index', -1) AS detail,
                 decode(repeat('00', 32), 'hex') AS genesis
          FROM generate_series(1, %(keys)s) AS g) AS k
  UNION ALL
    SELECT n.key, n.seq, n.event, n.attempt, n.at, n.detail, n.prev_hash,
           eos.event_hash(n.prev_hash, n.key, n.seq, n.event, n.attempt, n.at, n.detail)
    FROM (SELECT ev.key, ev.seq + 1 AS seq,
                 CASE WHEN ev.seq = 1 THEN 'committed' ELSE 'skipped' END::eos.event_kind
                     AS event,
                 CASE WHEN ev.seq = 1 THEN 1 ELSE ev.seq::int END AS attempt,
                 ev.at + interval '1 millisecond' AS at,
                 CASE WHEN ev.seq = 1 THEN jsonb_build_object('version', 1)
                      ELSE jsonb_build_object('on_committed', 'skip', 'version', 1) END
                     AS detail,
                 ev.hash AS prev_hash
          FROM ev WHERE ev.seq < %(per_key)s) AS n
)
SELECT key, seq, event, attempt, at, detail, prev_hash, hash FROM ev ORDER BY seq, key
"""

ROWS = """
INSERT INTO eos.ledger (key, state, attempt, dag_id, task_id, run_id, map_index, result,
                        version, claimed_at, committed_at, updated_at, event_seq, last_hash)
SELECT e.key, 'committed', 1, 'bench', 'load', 'scheduled__' || ltrim(substr(e.key, 7), '0'),
       -1, '{"rows": 1}', 1, e.at, e.at, e.at, e.seq, e.hash
FROM eos.ledger_events AS e
WHERE e.seq = %(per_key)s
"""


def admin_dsn(given: str | None) -> str:
    return given or os.environ.get("EOS_BENCH_DSN") or os.environ.get("EOS_TEST_DSN") or DEFAULT_DSN


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def quiet_cli(*argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli(list(argv))


def baseline(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        copy = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(
            sql.SQL(query("chain_events", "eos").decode().rstrip(";"))
        )
        with conn.cursor().copy(copy) as out:
            for _ in out:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="an admin DSN (default: EOS_BENCH_DSN, EOS_TEST_DSN)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--per-key", type=int, default=10, help="events per key (>= 2)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    keys = max(1, args.events // args.per_key)
    total = keys * args.per_key
    admin = admin_dsn(args.dsn)
    name = f"eos_bench_audit_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        version = conn.info.server_version
    dsn = conninfo.make_conninfo(admin, dbname=name)
    try:
        migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            generated = timed(
                lambda: (
                    conn.execute(GENERATE, {"keys": keys, "per_key": args.per_key}),
                    conn.execute(ROWS, {"per_key": args.per_key}),
                    conn.execute("VACUUM ANALYZE eos.ledger_events"),
                    conn.execute("VACUUM ANALYZE eos.ledger"),
                )
            )
            check = chain.verify(conn)
            assert check.ok and check.events == total, (check.events, check.problems[:3])
        print(
            f"PostgreSQL {version // 10000}, {total:,} events of {keys:,} keys "
            f"(generated in {generated:.1f} s, verified intact)"
        )
        results: dict[str, list[float]] = {
            "baseline: COPY of the chain rows": [],
            "ledger verify": [],
            "ledger export (JSON lines)": [],
            "ledger export --format csv": [],
            "ledger heads": [],
        }
        out = Path(f"/tmp/{name}.out")
        for _ in range(args.rounds):
            results["baseline: COPY of the chain rows"].append(timed(lambda: baseline(dsn)))
            results["ledger verify"].append(
                timed(lambda: quiet_cli("ledger", "verify", "--dsn", dsn) == 0 or sys.exit(1))
            )
            results["ledger export (JSON lines)"].append(
                timed(lambda: quiet_cli("ledger", "export", "--output", str(out), "--dsn", dsn))
            )
            results["ledger export --format csv"].append(
                timed(
                    lambda: quiet_cli(
                        "ledger", "export", "--format", "csv", "--output", str(out), "--dsn", dsn
                    )
                )
            )
            results["ledger heads"].append(
                timed(lambda: quiet_cli("ledger", "heads", "--out", str(out), "--dsn", dsn))
            )
        out.unlink(missing_ok=True)
        base = statistics.median(results["baseline: COPY of the chain rows"])
        print(f"{'':34} {'median s':>9} {'events/s':>12} {'x baseline':>11}")
        for label, times in results.items():
            median = statistics.median(times)
            print(f"{label:34} {median:9.2f} {total / median:12,.0f} {median / base:11.1f}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            cutoff = datetime.now(timezone.utc)
            seconds = timed(lambda: gc(conn, "eos", cutoff))
            after = chain.verify(conn)
            assert after.ok and after.events == keys, after.problems[:3]
        print(
            f"{'ledger gc (everything)':34} {seconds:9.2f} {total / seconds:12,.0f} "
            f"{seconds / base:11.1f}   (one run; verify afterwards: intact, "
            f"{after.events:,} `pruned` events left)"
        )
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


if __name__ == "__main__":
    main()
