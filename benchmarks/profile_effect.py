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

Then an interleaved A/B of the protocol's ledger statements sent as prepared statements from
their first use (psycopg ``prepare=True``) against the default (psycopg prepares a statement
after its 5th use on a connection): once on a long-lived pooled connection, once with a new
connection per effect (as an Airflow task has).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
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
from eos_airflow.protocol import local  # noqa: E402

_default_execute = local._execute


def _prepared_execute(conn: psycopg.Connection[Any], name: str, schema: str,
                      params: dict[str, Any]) -> psycopg.Cursor[Any]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(query(name, schema), params, prepare=True)


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
    ap.add_argument("--rounds", type=int, default=6, help="rounds of the A/B")
    ap.add_argument("--ab-ops", type=int, default=200, help="effects per side and A/B round")
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
                print(f"{label}: wall {median_ms(walls):.3f} ms median ({wall_mean:.3f} mean); "
                      f"client CPU {cpu:.3f} ms; {trips:g} round trips (~{trips * rtt_ms:.3f} ms "
                      f"of loopback latency); rest (server work, WAL flush) ~{server:.3f} ms")
            profiler = Profiler(interval=0.0002)
            profiler.start()
            for i in range(10_000, 10_000 + args.ops):
                empty(i)
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False, show_all=False)[:6000])
            if args.html:
                args.html.write_text(profiler.output_html())

            # A/B: prepare=True from the first use, pooled connection
            def with_execute(fn: Callable[[int], Any], impl: Any) -> Callable[[int], Any]:
                def run(i: int) -> Any:
                    local._execute = impl
                    try:
                        return fn(i)
                    finally:
                        local._execute = _default_execute
                return run

            times = interleaved({"default": with_execute(empty, _default_execute),
                                 "prepare": with_execute(empty, _prepared_execute)},
                                args.rounds, args.ab_ops, warmup=50)
            d, p = median_ms(times["default"]), median_ms(times["prepare"])
            print(f"A/B pooled connection: default {d:.3f} ms, prepare=True {p:.3f} ms "
                  f"(ratio {p / d:.3f})")

        def fresh(impl: Any) -> Callable[[int], Any]:
            def run(i: int) -> None:
                local._execute = impl
                try:
                    with Ledger(dsn) as one:
                        one.run(f"prof/fresh/{impl.__name__}/{i}", lambda eos: None)
                finally:
                    local._execute = _default_execute
            return run

        times = interleaved({"default": fresh(_default_execute),
                             "prepare": fresh(_prepared_execute)},
                            args.rounds, max(10, args.ab_ops // 4), warmup=5)
        d, p = median_ms(times["default"]), median_ms(times["prepare"])
        print(f"A/B new connection per effect: default {d:.3f} ms, prepare=True {p:.3f} ms "
              f"(ratio {p / d:.3f})")
        log("done")
    finally:
        scratch.drop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
