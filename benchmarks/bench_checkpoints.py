"""Cost of a chunked (checkpointed) load against a single-transaction load, and the work a
crash loses.

    python benchmarks/bench_checkpoints.py [--dsn DSN] [--rows 1000000] [--chunks 100]
                                           [--rounds 3] [--kills 5]

C1  the same rows through the transfer path in ``--chunks`` chunks (a recovery point and a
    COMMIT per chunk) divided by one transaction (``chunk_rows=None``). Sides alternate per
    round; medians count. Goal: ratio <= 1.05.
C2  work lost to a crash: a chunked load in a child process is SIGKILLed at a random moment
    (``--kills`` times, each on a fresh key); the rows it had consumed but not committed are
    measured from the child's progress (it reports every source row it consumed through a
    pipe) against the last recovery point. Goal: at most one chunk. A single-transaction
    load loses everything it had copied.

Uses the database set-up of bench_transfer.py (source ``generate_series`` table, dropped at
the end).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg  # noqa: E402
from bench_transfer import BenchDatabase, admin_dsn, eos_transfer, interleave, report  # noqa: E402

GOAL = 1.05

CHILD = textwrap.dedent("""
    import sys, psycopg
    from eos_airflow import Ledger
    from eos_airflow.protocol import transfer as t
    dsn, key, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rows = t.Stream.rows
    def counted(self, skip=0):
        for n, row in enumerate(rows(self, skip), start=skip + 1):
            if n % 1000 == 0:
                print(n, flush=True)
            yield row
    t.Stream.rows = counted
    with Ledger(dsn) as ledger:
        ledger.run(key, lambda eos: t.transfer(eos, lambda: psycopg.connect(dsn),
                   query="SELECT id, payload, amount FROM src ORDER BY id", table="dst",
                   chunk_rows=chunk))
""")


def lost_work(db: BenchDatabase, rows: int, chunk: int, kills: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    lost = []
    for k in range(kills):
        db.truncate()
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, db.dsn, f"c2/{k}", str(chunk)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        stop_at = rng.randint(chunk, rows - chunk)
        consumed = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            consumed = int(line)
            if consumed >= stop_at:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(60)
        with psycopg.connect(db.dsn) as conn:
            committed = conn.execute(
                "SELECT coalesce(max(rows), 0) FROM eos.recovery_points WHERE key = %s", [f"c2/{k}"]
            ).fetchone()[0]
        lost.append(consumed - committed)
    return lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("EOS_SEED", "1")))
    args = parser.parse_args(argv)
    chunk = args.rows // args.chunks
    db = BenchDatabase(admin_dsn(args.dsn), args.rows)
    try:
        print(f"C1: {args.rows:,} rows, {args.chunks} chunks of {chunk:,}, {args.rounds} rounds")
        times = interleave(
            db,
            args.rows,
            args.rounds,
            {
                "one transaction (baseline)": lambda r: eos_transfer(db.dsn, f"one/{r}"),
                f"{args.chunks} chunks": lambda r: eos_transfer(db.dsn, f"chunked/{r}", chunk),
            },
        )
        ratio = report(times, args.rows, "one transaction (baseline)")[f"{args.chunks} chunks"]
        print(f"C1 ratio {ratio:.3f} (goal <= {GOAL}): {'met' if ratio <= GOAL else 'NOT met'}")
        started = time.perf_counter()
        lost = lost_work(db, args.rows, chunk, args.kills, args.seed)
        print(
            f"C2: {args.kills} SIGKILLs at random points: rows consumed but not committed "
            f"{lost} (max {max(lost):,}; one chunk = {chunk:,} rows): "
            f"{'met' if max(lost) <= chunk else 'NOT met'} "
            f"({time.perf_counter() - started:.1f} s)"
        )
    finally:
        db.drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
