"""P1 over a network: an effect's latency against the bare transaction when every round trip
costs more than loopback's few microseconds.

    python benchmarks/bench_network.py [--dsn DSN] [--delays 0,0.1,0.25,0.5] [--rounds 4]
                                       [--ops 200]

For each one-way delay (milliseconds), a delay proxy (benchmarks/delay_proxy.py, its own
process) sits between the client and PostgreSQL, and these run interleaved through it, on one
connection each, a fresh key per call:

- ``bare``: INSERT + COMMIT in a plain psycopg transaction (BEGIN, INSERT, COMMIT: three round
  trips), the P1 baseline;
- ``effect``: ``Ledger.run(key, fn)`` writing the same row, as shipped (three round trips);
- ``five trips``: the same protocol calls sent one statement at a time (claim, BEGIN, INSERT,
  commit(), COMMIT), the hot path before schema revision 0009 (benchmarks/profile_effect.py's
  ``separate``).

It prints the measured round trip (``SELECT 1`` through the proxy) and the medians and
ratios. The proxy adds about 0.1 ms of its own per round trip at delay 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_effects  # noqa: E402
import psycopg  # noqa: E402
from profile_effect import _variants  # noqa: E402
from psycopg import conninfo  # noqa: E402
from run_all import Scratch, interleaved, log, median_ms  # noqa: E402

from eos_airflow.api import Ledger  # noqa: E402


@contextmanager
def delayed(dsn: str, delay_ms: float) -> Iterator[str]:
    """``dsn`` rewritten to go through a delay proxy adding ``delay_ms`` each way."""
    info = conninfo.conninfo_to_dict(dsn)
    host, port = info.get("host") or "127.0.0.1", info.get("port") or "5432"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "delay_proxy.py"),
            "--to",
            f"{host}:{port}",
            "--delay-ms",
            str(delay_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        listen = int(proc.stdout.readline())
        yield conninfo.make_conninfo(dsn, host="127.0.0.1", port=str(listen))
    finally:
        proc.kill()
        proc.wait()


def measure(dsn: str, rounds: int, ops: int) -> dict[str, float]:
    tag = os.urandom(3).hex()
    variants = _variants()
    bare_conn = psycopg.connect(dsn)
    raw = psycopg.connect(dsn, autocommit=True)
    with Ledger(dsn) as ledger:

        def bare(i: int) -> None:
            with bare_conn.transaction():
                bare_conn.execute(bench_effects.INSERT, ("bare", i))

        def effect(i: int) -> None:
            def write(eos: Any) -> None:
                eos.conn.execute(bench_effects.INSERT, ("eos", i))

            ledger.run(f"net/{tag}/effect/{i}", write)

        def five(i: int) -> None:
            variants["separate"](raw, f"net/{tag}/five/{i}", i)

        rtt = []
        for _ in range(200):
            t0 = time.perf_counter()
            raw.execute("SELECT 1")
            rtt.append(time.perf_counter() - t0)
        times = interleaved(
            {"bare": bare, "effect": effect, "five trips": five}, rounds, ops, warmup=30
        )
    bare_conn.close()
    raw.close()
    return {"rtt": median_ms(rtt), **{name: median_ms(v) for name, v in times.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn")
    ap.add_argument("--delays", default="0,0.1,0.25,0.5", help="one-way delays, ms")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ops", type=int, default=200, help="calls per side and round")
    args = ap.parse_args()
    admin = bench_effects._admin_dsn(args.dsn)  # noqa: SLF001
    bench_effects._check_loopback(admin)  # noqa: SLF001
    scratch = Scratch(admin)
    rows = []
    try:
        dsn = scratch.create("net")
        for delay in (float(d) for d in args.delays.split(",")):
            with delayed(dsn, delay) as via:
                got = measure(via, args.rounds, args.ops)
            log(
                f"one-way delay {delay:g} ms: round trip {got['rtt']:.3f} ms, bare "
                f"{got['bare']:.3f} ms, effect {got['effect']:.3f} ms, five trips "
                f"{got['five trips']:.3f} ms"
            )
            rows.append((delay, got))
    finally:
        scratch.drop_all()
    print(
        "\n| one-way delay | round trip (SELECT 1) | bare INSERT+COMMIT | effect | ratio "
        "| five round trips (before 0009) | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for delay, got in rows:
        print(
            f"| {delay:g} ms | {got['rtt']:.3f} ms | {got['bare']:.3f} ms | "
            f"{got['effect']:.3f} ms | **{got['effect'] / got['bare']:.2f}** | "
            f"{got['five trips']:.3f} ms | {got['five trips'] / got['bare']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
