"""Overhead of an exactly-once effect against a bare transaction on the same server.

    python benchmarks/bench_effects.py [--dsn DSN] [--seconds 10] [--writers 1,4,16,32]
                                       [--ops N] [--json PATH]

P1  latency of one effect wrapping a 1-row INSERT (``Ledger.run(key, fn)``, a fresh key per
    call) divided by the latency of the same INSERT in a bare transaction (psycopg,
    non-autocommit, ``with conn.transaction(): conn.execute(insert)``). Both run on one
    connection each, interleaved in rounds (the order alternates per round) so that drift on
    the server or the machine affects both. Goal: median ratio <= 1.3.
P2  throughput of 16 concurrent writers (threads, one connection each; the effects share one
    ``Ledger`` whose pool gives each thread its own connection): effects/s divided by bare
    transactions/s. Each side runs ``--seconds`` (after a short unmeasured ramp), in the order
    bare, eos, eos, bare, and the mean of its two runs counts. Goal: ratio >= 0.8.

The script creates a database ``eos_bench_<random>`` through the admin DSN (``--dsn``, else
$EOS_BENCH_DSN, $EOS_TEST_DSN, else postgresql://postgres@127.0.0.1/postgres), migrates the
ledger into it, and drops it at the end. It talks to loopback servers only.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import platform
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402
from psycopg import conninfo, sql  # noqa: E402

from eos_airflow.api import Ledger  # noqa: E402
from eos_airflow.ledger.migrate import migrate  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1/postgres"
P1_GOAL = 1.3
P2_GOAL = 0.8
P2_WRITERS = 16
#: Target wall time of P1's measured rounds when --ops is not given (the whole P1 stays < 60 s).
P1_BUDGET_S = 30.0
#: P1 stops after the round that passes this many seconds, even if rounds remain.
P1_DEADLINE_S = 55.0
#: No statement of the benchmark may hang it: the server cancels any statement after this.
STATEMENT_TIMEOUT_MS = 120_000
SETTINGS = (
    "server_version",
    "synchronous_commit",
    "fsync",
    "wal_sync_method",
    "full_page_writes",
    "commit_delay",
    "wal_level",
    "shared_buffers",
    "max_connections",
)

TABLE = "bench_rows"
INSERT = f"INSERT INTO {TABLE} (who, n) VALUES (%s, %s)"  # noqa: S608 (constant)


# --- set-up -------------------------------------------------------------------------------


def _admin_dsn(arg: str | None) -> str:
    return arg or os.environ.get("EOS_BENCH_DSN") or os.environ.get("EOS_TEST_DSN") or DEFAULT_DSN


def _check_loopback(dsn: str) -> None:
    params = conninfo.conninfo_to_dict(dsn)
    hosts = [
        h
        for h in (
            params.get("hostaddr") or params.get("host") or os.environ.get("PGHOST") or ""
        ).split(",")
        if h
    ]
    for host in hosts:
        if host.startswith("/") or host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host).is_loopback:
                continue
        except ValueError:
            pass
        sys.exit(
            f"bench_effects: refusing non-loopback host {host!r} (use 127.0.0.1, ::1, "
            "localhost or a Unix socket)"
        )


def _with_db(dsn: str, dbname: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    params["options"] = (
        f"{params.get('options') or ''} -c statement_timeout={STATEMENT_TIMEOUT_MS}".strip()
    )
    return conninfo.make_conninfo(**params)


def _server_settings(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        out = {
            name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
            for name in SETTINGS
        }
        out["version"] = conn.execute("SELECT version()").fetchone()[0]
    return out


def _checkpoint(dsn: str) -> None:
    """Start each measurement with a fresh checkpoint so full-page writes hit both sides alike."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.Error:
        pass  # not a superuser: carry on without


# --- P1: latency --------------------------------------------------------------------------


class Bare:
    """One plain psycopg connection committing the INSERT in its own transaction."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn)  # non-autocommit, like most application code

    def op(self, n: int) -> None:
        with self.conn.transaction():
            self.conn.execute(INSERT, ("bare", n))

    def close(self) -> None:
        self.conn.close()


class Eos:
    """One effect per call, with a fresh key, writing the same INSERT through the ledger."""

    def __init__(self, ledger: Ledger, tag: str) -> None:
        self.ledger = ledger
        # a fresh key space per instance: a repeated run on the same ledger must write new
        # effects, not skip the committed keys of the previous run
        self.tag = f"{tag}/{secrets.token_hex(4)}"

    def op(self, n: int) -> None:
        def fn(eos: Any) -> None:
            eos.conn.execute(INSERT, ("eos", n))

        self.ledger.run(f"bench/{self.tag}/{n}", fn)

    def close(self) -> None:
        pass


def _timed(side: Bare | Eos, start: int, count: int) -> list[float]:
    """Run ``count`` operations numbered from ``start``; return each one's seconds."""
    clock = time.perf_counter
    out = []
    for n in range(start, start + count):
        t0 = clock()
        side.op(n)
        out.append(clock() - t0)
    return out


def _pct(values: list[float], q: float) -> float:
    """Percentile ``q`` (0..100) with linear interpolation."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_p1(
    dsn: str, ledger: Ledger, rounds: int, ops: int | None, warmup: int, log: Any
) -> dict[str, Any]:
    bare, eos = Bare(dsn), Eos(ledger, "p1")
    seq = 0
    try:
        # Warm-up: connections, prepared statements (psycopg prepares after 5 runs), caches.
        w_bare = _timed(bare, seq, warmup)
        w_eos = _timed(eos, seq, warmup)
        seq += warmup
        if ops is None:  # size from the warm-up means (they include the slow tail)
            per_pair = statistics.fmean(w_bare) + statistics.fmean(w_eos)
            ops = max(100, min(5000, int(P1_BUDGET_S / (rounds * per_pair))))
        log(f"P1: warm-up {warmup}+{warmup} ops, then {rounds} rounds x {ops} ops per side")
        _checkpoint(dsn)
        per_round = []
        all_bare: list[float] = []
        all_eos: list[float] = []
        t_start = time.perf_counter()
        for r in range(rounds):
            order = (("bare", bare), ("eos", eos)) if r % 2 == 0 else (("eos", eos), ("bare", bare))
            got: dict[str, list[float]] = {}
            for name, side in order:
                gc.collect()
                got[name] = _timed(side, seq, ops)
                seq += ops
            all_bare += got["bare"]
            all_eos += got["eos"]
            per_round.append(
                {
                    "first": order[0][0],
                    "bare_median_ms": statistics.median(got["bare"]) * 1e3,
                    "eos_median_ms": statistics.median(got["eos"]) * 1e3,
                }
            )
            log(
                f"  round {r + 1}/{rounds}: bare {per_round[-1]['bare_median_ms']:.3f} ms, "
                f"eos {per_round[-1]['eos_median_ms']:.3f} ms (medians)"
            )
            if time.perf_counter() - t_start > P1_DEADLINE_S and r + 1 < rounds:
                log(f"P1: stopping after {r + 1} rounds ({P1_DEADLINE_S:g} s passed)")
                break
        elapsed = time.perf_counter() - t_start
    finally:
        bare.close()
        eos.close()
    return {
        "rounds": len(per_round),
        "ops_per_round": ops,
        "warmup": warmup,
        "elapsed_s": elapsed,
        "per_round": per_round,
        "bare_median_ms": statistics.median(all_bare) * 1e3,
        "eos_median_ms": statistics.median(all_eos) * 1e3,
        "bare_p95_ms": _pct(all_bare, 95) * 1e3,
        "eos_p95_ms": _pct(all_eos, 95) * 1e3,
        "bare_mean_ms": statistics.fmean(all_bare) * 1e3,
        "eos_mean_ms": statistics.fmean(all_eos) * 1e3,
        "bare_samples_ms": [round(x * 1e3, 4) for x in all_bare],
        "eos_samples_ms": [round(x * 1e3, 4) for x in all_eos],
    }


# --- P2: throughput -----------------------------------------------------------------------


def _throughput(
    kind: str, dsn: str, ledger: Ledger, writers: int, seconds: float, ramp: float, tag: str
) -> float:
    """Operations per second completed by ``writers`` threads in the measured window."""
    counts = [0] * writers
    errors: list[BaseException] = []
    ready = threading.Barrier(writers + 1)
    window: list[float] = []  # [measure_from, measure_to], set by the main thread

    if kind == "eos":  # fill the pool so that no thread connects inside the window
        conns = [ledger.connection() for _ in range(writers)]
        for c in conns:
            ledger.putconn(c)

    def worker(i: int) -> None:
        side: Bare | Eos
        try:
            side = Bare(dsn) if kind == "bare" else Eos(ledger, f"{tag}/{i}")
        except BaseException as exc:
            errors.append(exc)
            ready.abort()
            return
        clock = time.perf_counter
        n = done = 0
        try:
            ready.wait()
            lo, hi = window
            while True:
                side.op(n)
                n += 1
                t = clock()
                if t > hi:
                    break
                if t >= lo:
                    done += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            counts[i] = done
            side.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(writers)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    window[:] = [now + ramp, now + ramp + seconds]
    try:
        ready.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join(timeout=ramp + seconds + 120)
    if errors:
        raise RuntimeError(f"P2 {kind} writer failed: {errors[0]!r}") from errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"P2 {kind}: a writer did not stop")
    return sum(counts) / seconds


def run_p2(
    dsn: str, ledger: Ledger, writers: int, seconds: float, ramp: float, log: Any
) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"bare": [], "eos": []}
    for i, kind in enumerate(("bare", "eos", "eos", "bare")):
        _checkpoint(dsn)
        tps = _throughput(kind, dsn, ledger, writers, seconds, ramp, f"p2/{writers}/{i}")
        runs[kind].append(tps)
        log(f"P2: {writers:>2} writers, {kind:<4} run {len(runs[kind])}: {tps:,.0f} ops/s")
    return {
        "writers": writers,
        "seconds": seconds,
        "ramp_s": ramp,
        "order": "bare,eos,eos,bare",
        "bare_runs": runs["bare"],
        "eos_runs": runs["eos"],
        "bare_ops_s": statistics.fmean(runs["bare"]),
        "eos_ops_s": statistics.fmean(runs["eos"]),
    }


# --- report -------------------------------------------------------------------------------


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(settings: dict[str, str], p1: dict[str, Any], p2: dict[int, dict[str, Any]]) -> str:
    head = ("metric", "baseline", "eos", "ratio", "goal", "met")
    rows: list[tuple[str, ...]] = [head]

    def lat(label: str, b: float, e: float) -> None:
        ratio = e / b
        rows.append(
            (
                label,
                f"{b:.3f} ms",
                f"{e:.3f} ms",
                f"{ratio:.2f}",
                f"<= {P1_GOAL}",
                "yes" if ratio <= P1_GOAL else "NO",
            )
        )

    lat("P1 latency median (1 writer)", p1["bare_median_ms"], p1["eos_median_ms"])
    lat("P1 latency p95 (1 writer)", p1["bare_p95_ms"], p1["eos_p95_ms"])
    for w in sorted(p2):
        b, e = p2[w]["bare_ops_s"], p2[w]["eos_ops_s"]
        ratio = e / b
        goal = w == P2_WRITERS
        rows.append(
            (
                f"{'P2 ' if goal else ''}throughput ({w} writers)",
                f"{b:,.0f} /s",
                f"{e:,.0f} /s",
                f"{ratio:.2f}",
                f">= {P2_GOAL}" if goal else "-",
                ("yes" if ratio >= P2_GOAL else "NO") if goal else "-",
            )
        )
    info = [
        f"PostgreSQL {settings['server_version']} | synchronous_commit={settings['synchronous_commit']}"
        f" fsync={settings['fsync']} wal_sync_method={settings['wal_sync_method']}"
        f" full_page_writes={settings['full_page_writes']} commit_delay={settings['commit_delay']}"
        f" shared_buffers={settings['shared_buffers']}",
        f"client: Python {platform.python_version()}, psycopg {psycopg.__version__} "
        f"({psycopg.pq.__impl__}, libpq {psycopg.pq.version()}), {os.cpu_count()} CPUs | "
        f"P1 {p1['rounds']} rounds x {p1['ops_per_round']} ops per side, "
        f"P2 {next(iter(p2.values()))['seconds']:g} s x 2 runs per side | "
        f"load average at end {os.getloadavg()[0]:.1f}",
    ]
    return _table(rows) + "\n\n" + "\n".join(info)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dsn",
        help="admin DSN (default $EOS_BENCH_DSN, $EOS_TEST_DSN or "
        f"{DEFAULT_DSN}); a scratch database is created and dropped through it",
    )
    ap.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds of each P2 run (default 10)"
    )
    ap.add_argument(
        "--ramp",
        type=float,
        default=1.0,
        help="unmeasured seconds at the start of each P2 run (default 1)",
    )
    ap.add_argument(
        "--writers",
        default=str(P2_WRITERS),
        help="comma-separated writer counts for the throughput test (default 16; e.g. 1,4,16,32)",
    )
    ap.add_argument("--rounds", type=int, default=5, help="P1 rounds (default 5)")
    ap.add_argument(
        "--ops",
        type=int,
        default=None,
        help="P1 operations per side and round (default: sized from the warm-up "
        f"so that the rounds take about {P1_BUDGET_S:g} s)",
    )
    ap.add_argument("--warmup", type=int, default=300, help="P1 warm-up ops per side")
    ap.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    ap.add_argument("--keep-db", action="store_true", help="do not drop the scratch database")
    args = ap.parse_args(argv)
    writers = sorted({int(w) for w in args.writers.split(",") if w.strip()})
    if not writers or min(writers) < 1:
        ap.error("--writers needs positive integers")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    admin = _admin_dsn(args.dsn)
    _check_loopback(admin)
    dbname = f"eos_bench_{secrets.token_hex(4)}"
    dsn = _with_db(admin, dbname)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    log(f"created database {dbname}")
    ledger = None
    try:
        migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f"CREATE TABLE {TABLE} (id bigint GENERATED ALWAYS AS IDENTITY "
                "PRIMARY KEY, who text NOT NULL, n bigint NOT NULL)"
            )
        settings = _server_settings(dsn)
        ledger = Ledger(dsn, max_idle=max(32, max(writers)))
        p1 = run_p1(dsn, ledger, args.rounds, args.ops, args.warmup, log)
        p2 = {w: run_p2(dsn, ledger, w, args.seconds, args.ramp, log) for w in writers}
        if P2_WRITERS not in p2:
            log(f"note: P2 goal applies to {P2_WRITERS} writers, which --writers left out")
        print(report(settings, p1, p2))
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "settings": settings,
                        "database": dbname,
                        "client": {
                            "python": platform.python_version(),
                            "psycopg": psycopg.__version__,
                            "libpq": psycopg.pq.version(),
                            "cpus": os.cpu_count(),
                        },
                        "goals": {
                            "p1_ratio_max": P1_GOAL,
                            "p2_ratio_min": P2_GOAL,
                            "p2_writers": P2_WRITERS,
                        },
                        "p1": p1,
                        "p2": {str(w): v for w, v in p2.items()},
                    },
                    indent=1,
                )
            )
            log(f"raw numbers written to {args.json}")
    finally:
        if ledger is not None:
            ledger.close()
        if args.keep_db:
            log(f"kept database {dbname}")
        else:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(dbname)
                    )
                )
            log(f"dropped database {dbname}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
