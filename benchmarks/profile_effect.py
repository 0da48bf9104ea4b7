"""Where the time of one effect goes: client CPU, server, round trips; and one A/B experiment.

    python benchmarks/profile_effect.py [--dsn DSN] [--ops 2000] [--rounds 6] [--html PATH]

For an empty effect (``Ledger.run(key, lambda eos: None)``) and for one wrapping a 1-row
INSERT, on one pooled connection:

- wall time per effect (median) and the client's CPU time per effect (``time.process_time``
  over the loop: Python, psycopg, libpq);
- round trips per effect, counted from a libpq trace (one per ``Sync``/``Query`` message the
  client sends) and the cost of one round trip (``SELECT 1``, median);
- the rest -- wall minus client CPU minus the round trips' latency -- is time in the server
  (planning, PL/pgSQL, writes, the WAL flush of COMMIT);
- a pyinstrument profile of the loop (``--html`` writes it as HTML; the text summary is
  printed).

Then the same protocol sent four ways over the wire (``wire_variants``), on plain
connections calling the shipped ledger functions, so that only the wire differs:

- ``separate``: claim, BEGIN, INSERT, commit(), COMMIT -- five round trips (psycopg prepares
  each statement on its 5th use), the hot path until schema revision 0009;
- ``pipelined``: psycopg pipeline mode, claim + Sync + BEGIN and commit() + COMMIT -- three
  round trips (the Sync is queued with psycopg's private ``_enqueue_sync``: measured, not
  shipped);
- ``combined``: the claim with COMMIT and BEGIN, and commit() with COMMIT, each one
  simple-protocol message bound on the client (``claim_then_begin``, ``commit_then_end``) --
  what a connection's first effect sends (an Airflow task's only one);
- ``prepared``: the same messages executing session-level prepared statements (``EXECUTE``)
  -- what later effects on a connection send (the protocol prepares the calls in its second
  effect's claim message; here they are prepared once up front).

Each is timed interleaved with the others (median wall time and client CPU per effect, one
thread), then as throughput with ``--writers`` threads, one connection each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_effects  # noqa: E402
import psycopg  # noqa: E402
from run_all import Scratch, interleaved, log, median_ms  # noqa: E402

from eos_airflow.api import Ledger  # noqa: E402
from eos_airflow.ledger.queries import query  # noqa: E402


def _params(key: str, owner: uuid.UUID) -> dict[str, Any]:
    return {
        "key": key,
        "owner": owner,
        "attempt": 1,
        "dag_id": "bench",
        "task_id": "wire",
        "run_id": "r",
        "map_index": -1,
        "host": "bench",
        "pid": os.getpid(),
        "on_committed": "skip",
    }


def _variants() -> dict[str, Callable[[psycopg.Connection[Any], str, int], None]]:
    """The four wires; each runs one effect with a 1-row INSERT on an autocommit connection."""
    q = {
        name: query(name, "eos")
        for name in ("claim", "commit", "claim_then_begin", "commit_then_end")
    }
    q["prepare"] = (  # the calls as session-level prepared statements
        b"PREPARE wire_claim (text, uuid, integer, text, text, text, integer, text, integer, "
        b"text) AS SELECT action, prior_state::text AS prior_state, attempt, version, result, "
        b"holder, committed_at FROM eos.claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10); "
        b"PREPARE wire_commit (text, uuid, jsonb) AS "
        b"SELECT version, committed_at FROM eos.commit($1, $2, $3)"
    )
    q["claim_prepared_then_begin"] = (
        b"EXECUTE wire_claim(%(key)s, %(owner)s, %(attempt)s, %(dag_id)s, %(task_id)s, "
        b"%(run_id)s, %(map_index)s, %(host)s, %(pid)s, %(on_committed)s); COMMIT; BEGIN"
    )
    q["commit_prepared_then_end"] = b"EXECUTE wire_commit(%(key)s, %(owner)s, %(result)s); COMMIT"
    ready: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()

    def separate(conn: psycopg.Connection[Any], key: str, n: int) -> None:
        owner = uuid.uuid4()
        conn.execute(q["claim"], _params(key, owner)).fetchone()
        conn.execute("BEGIN")
        conn.execute(bench_effects.INSERT, ("wire", n))
        conn.execute(q["commit"], {"key": key, "owner": owner, "result": "null"}).fetchone()
        conn.execute("COMMIT")

    def pipelined(conn: psycopg.Connection[Any], key: str, n: int) -> None:
        owner = uuid.uuid4()
        cur = conn.cursor()
        with conn.pipeline() as pipeline:
            cur.execute(q["claim"], _params(key, owner))
            pipeline._enqueue_sync()  # noqa: SLF001 - the claim commits before BEGIN
            conn.execute("BEGIN")
        cur.fetchone()
        conn.execute(bench_effects.INSERT, ("wire", n))
        cur = conn.cursor()
        with conn.pipeline():
            cur.execute(q["commit"], {"key": key, "owner": owner, "result": "null"})
            conn.execute("COMMIT")
        cur.fetchone()

    def first_row(conn: psycopg.Connection[Any], message: bytes, params: dict[str, Any]) -> None:
        cur = psycopg.ClientCursor(conn)
        cur.execute(message, params)
        while cur.description is None and cur.nextset():
            pass
        cur.fetchone()

    def combined(conn: psycopg.Connection[Any], key: str, n: int) -> None:
        owner = uuid.uuid4()
        first_row(conn, q["claim_then_begin"], _params(key, owner))
        conn.execute(bench_effects.INSERT, ("wire", n))
        first_row(conn, q["commit_then_end"], {"key": key, "owner": owner, "result": "null"})

    def prepared(conn: psycopg.Connection[Any], key: str, n: int) -> None:
        if conn not in ready:
            conn.execute(q["prepare"])
            ready.add(conn)
        owner = uuid.uuid4()
        first_row(conn, q["claim_prepared_then_begin"], _params(key, owner))
        conn.execute(bench_effects.INSERT, ("wire", n))
        first_row(
            conn, q["commit_prepared_then_end"], {"key": key, "owner": owner, "result": "null"}
        )

    return {
        "separate": separate,
        "pipelined": pipelined,
        "combined": combined,
        "prepared": prepared,
    }


def wire_variants(dsn: str, rounds: int, ops: int, writers: str, seconds: float) -> None:
    variants = _variants()
    tag = os.urandom(3).hex()
    conns = {name: psycopg.connect(dsn, autocommit=True) for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}

    def side(name: str) -> Callable[[int], None]:
        def run(i: int) -> None:
            c0 = time.process_time()
            variants[name](conns[name], f"wire/{tag}/{name}/{i}", i)
            cpu[name].append(time.process_time() - c0)

        return run

    try:
        times = interleaved({name: side(name) for name in variants}, rounds, ops, warmup=50)
    finally:
        for conn in conns.values():
            conn.close()
    base = median_ms(times["separate"])
    print("\nwire (one thread, interleaved; median per effect with a 1-row INSERT):")
    for name in variants:
        wall = median_ms(times[name])
        print(
            f"  {name:<10} wall {wall:.3f} ms ({wall / base:.2f} of separate), client CPU "
            f"{statistics.fmean(cpu[name]) * 1e3:.3f} ms"
        )
    for count in (int(w) for w in writers.split(",")):
        got = {
            name: _throughput(dsn, variants[name], count, seconds, f"{tag}/{count}/{name}")
            for name in variants
        }
        print(f"  {count:>2} writers: " + ", ".join(f"{n} {v:,.0f}/s" for n, v in got.items()))


def _throughput(
    dsn: str,
    fn: Callable[[psycopg.Connection[Any], str, int], None],
    writers: int,
    seconds: float,
    tag: str,
) -> float:
    counts = [0] * writers
    stop = time.perf_counter() + seconds
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(writers)]

    def work(i: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            fn(conns[i], f"wire/{tag}/{i}/{n}", n)
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for conn in conns:
            conn.close()
    return sum(counts) / seconds


def round_trips(ledger: Ledger, fn: Callable[[int], Any]) -> float:
    """Messages that end a round trip (Sync, simple Query), per effect, from a libpq trace."""
    conn = ledger.connection()
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        ledger.putconn(conn)
        n = 50
        for i in range(n):
            fn(i)
        conn.pgconn.untrace()
        trace.seek(0)
        lines = [ln.split("\t") for ln in trace.read().splitlines()]
    sent = [ln for ln in lines if len(ln) > 3 and ln[1] == "F" and ln[3] in ("Sync", "Query")]
    return len(sent) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn")
    ap.add_argument("--ops", type=int, default=2000, help="effects in the profiled loop")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of the wire comparison")
    ap.add_argument(
        "--ab-ops",
        type=int,
        default=500,
        help="effects per variant and round of the wire comparison",
    )
    ap.add_argument(
        "--writers", default="1,2,16", help="thread counts of the wire throughput comparison"
    )
    ap.add_argument(
        "--seconds", type=float, default=3.0, help="measured seconds of each throughput run"
    )
    ap.add_argument("--html", type=Path, help="write the pyinstrument profile here")
    args = ap.parse_args()
    from pyinstrument import Profiler

    admin = bench_effects._admin_dsn(args.dsn)
    bench_effects._check_loopback(admin)
    scratch = Scratch(admin)
    try:
        dsn = scratch.create("prof")
        with Ledger(dsn) as ledger:
            tag = os.urandom(3).hex()

            def empty(i: int) -> None:
                ledger.run(f"prof/{tag}/empty/{i}", lambda eos: None)

            def insert(i: int) -> None:
                def write(eos: Any) -> None:
                    eos.conn.execute(bench_effects.INSERT, ("eos", i))

                ledger.run(f"prof/{tag}/insert/{i}", write)

            conn = ledger.connection()
            rtt = [0.0] * 500
            for i in range(len(rtt)):
                t0 = time.perf_counter()
                conn.execute("SELECT 1")
                rtt[i] = time.perf_counter() - t0
            ledger.putconn(conn)
            rtt_ms = median_ms(rtt)
            print(f"one round trip (SELECT 1): {rtt_ms:.3f} ms median")
            for label, fn in (("empty effect", empty), ("1-row INSERT effect", insert)):
                trips = round_trips(ledger, fn)
                for i in range(100, 300):  # warm
                    fn(i)
                walls = []
                cpu0 = time.process_time()
                w0 = time.perf_counter()
                for i in range(1000, 1000 + args.ops):
                    t0 = time.perf_counter()
                    fn(i)
                    walls.append(time.perf_counter() - t0)
                cpu = (time.process_time() - cpu0) / args.ops * 1e3
                wall_mean = (time.perf_counter() - w0) / args.ops * 1e3
                server = wall_mean - cpu - trips * rtt_ms
                print(
                    f"{label}: wall {median_ms(walls):.3f} ms median ({wall_mean:.3f} mean); "
                    f"client CPU {cpu:.3f} ms; {trips:g} round trips (~{trips * rtt_ms:.3f} ms "
                    f"of loopback latency); rest (server work, WAL flush) ~{server:.3f} ms"
                )
            profiler = Profiler(interval=0.0002)
            profiler.start()
            for i in range(10_000, 10_000 + args.ops):
                empty(i)
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False, show_all=False)[:6000])
            if args.html:
                args.html.write_text(profiler.output_html())

        wire_variants(dsn, args.rounds, args.ab_ops, args.writers, args.seconds)
        log("done")
    finally:
        scratch.drop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
