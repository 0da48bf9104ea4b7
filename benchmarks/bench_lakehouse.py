"""P9 and P10: exactly-once lakehouse writes against the same write made by the library alone.

    python benchmarks/bench_lakehouse.py [--dsn DSN] [--rows 10000,100000,1000000]
                                         [--max-rows N] [--rounds 5] [--backends file,s3]
                                         [--formats iceberg,delta] [--json PATH]
                                         [--docs PATH] [--img-dir DIR]

P9   an N-row Iceberg append in an effect (``Ledger.run(key, fn)`` whose function calls
     ``eos.iceberg("bench.t").append(arrow_table)``, a fresh key per call) / the same Arrow
     table appended with plain pyiceberg (``SqlCatalog(...).load_table("bench.t").append``)
     to a stock SQL catalog in another database of the same PostgreSQL server. Goal <= 1.05
     at 1,000,000 rows.
P10  an N-row Delta write in an effect (``eos.delta(uri).write(arrow_table)``: Delta's
     transaction marker read and written with the data) / plain
     ``deltalake.write_deltalake(uri, arrow_table, mode="append")``. Goal <= 1.05 at
     1,000,000 rows.

Both on ``file://`` (a temporary directory) and on a local S3 API (moto's server,
eos_airflow/devtools/s3.py, or $EOS_S3_ENDPOINT), at each size of ``--rows`` (capped by
``--max-rows``). Each side writes a table of its own, created (and written once, unmeasured)
before the rounds; in every round both sides write once, the order alternating round by
round, and the median of each side counts. The rows written are counted at the end.

``--json`` writes the raw seconds of every write (docs/results/lakehouse-bench.json is the
committed run); ``--docs`` rewrites the section between ``<!-- lakehouse:begin -->`` and
``<!-- lakehouse:end -->`` of that file, and ``--img-dir`` the plot, both from the raw
results alone (:func:`render` and :func:`plot`; ``--from-json PATH`` re-renders a committed
run without measuring). ``benchmarks/run_all.py`` runs the same measurement as its parts P9
and P10.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402
from psycopg import conninfo, sql  # noqa: E402

from eos_airflow import Ledger  # noqa: E402
from eos_airflow.ledger.migrate import migrate  # noqa: E402

FORMATS = ("iceberg", "delta")
BACKENDS = ("file", "s3")
PART = {"iceberg": "P9", "delta": "P10"}
GOAL = 1.05
BEGIN_MARK = "<!-- lakehouse:begin -->"
END_MARK = "<!-- lakehouse:end -->"
PLOT = "bench_lakehouse.png"
BASELINE = {
    "iceberg": "plain pyiceberg SqlCatalog append",
    "delta": "plain deltalake.write_deltalake",
}
MEASURED = {
    "iceberg": "eos.iceberg(...).append in Ledger.run",
    "delta": "eos.delta(...).write in Ledger.run",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def arrow_rows(n: int) -> Any:
    """``n`` rows: ``id`` int64, ``payload`` string, ``amount`` float64."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.array(np.arange(n, dtype=np.int64))
    payload = pc.binary_join_element_wise("row ", pc.cast(ids, pa.string()), "")
    amount = pa.array(np.arange(n, dtype=np.float64) * 0.01)
    return pa.table({"id": ids, "payload": payload, "amount": amount})


# --- storage ---------------------------------------------------------------------------------


@contextmanager
def storage(backend: str, scratch_dir: str) -> Iterator[tuple[str, dict[str, str], dict[str, str]]]:
    """(root URI, pyiceberg properties, delta storage options) of a backend."""
    if backend == "file":
        yield Path(scratch_dir).as_uri(), {}, {}
        return
    from eos_airflow.devtools.s3 import start_s3

    s3 = start_s3()
    try:
        root = s3.bucket(f"eos-bench-{secrets.token_hex(4)}")
        yield root, s3.iceberg_properties(), s3.delta_options()
    finally:
        s3.stop()


# --- one format, one backend, one size ----------------------------------------------------


def _sides(
    fmt: str,
    ledger: Ledger,
    base_dsn: str,
    root: str,
    props: dict[str, str],
    opts: dict[str, str],
    label: str,
    data: Any,
) -> tuple[dict[str, Callable[[int], None]], Callable[[], dict[str, int]], Callable[[], None]]:
    """The two sides' write calls (argument: the call number), the two sides' opening of
    the table without writing (in an effect: ``eos.iceberg(...)``, ``eos.delta(...).prepare()``
    — the marker read), a row counter, a closer."""
    if fmt == "iceberg":
        from pyiceberg.catalog.sql import SqlCatalog

        from eos_airflow.protocol.iceberg import reader_uri

        name = f"bench.t_{label}"
        base_wh, eos_wh = f"{root}/iceberg-base", f"{root}/iceberg-eos"
        stock = SqlCatalog("bench", uri=reader_uri(base_dsn), warehouse=base_wh, **props)
        if not stock.namespace_exists("bench"):
            stock.create_namespace("bench")
        stock.create_table(name, schema=data.schema)
        ledger.run(
            f"lake/{label}/create",
            lambda eos: bool(
                eos.iceberg(name, schema=data.schema, warehouse=eos_wh, properties=props)
            ),
        )

        def baseline(i: int) -> None:
            stock.load_table(name).append(data)

        def eos_side(i: int) -> None:
            ledger.run(
                f"lake/{label}/{i}", lambda eos: eos.iceberg(name, properties=props).append(data)
            )

        reader = SqlCatalog("eos", uri=reader_uri(ledger.dsn), warehouse=eos_wh, **props)

        def count() -> dict[str, int]:
            return {
                "baseline": stock.load_table(name).scan().to_arrow().num_rows,
                "eos": reader.load_table(name).scan().to_arrow().num_rows,
            }

        def close() -> None:
            stock.close()
            reader.close()

        def base_open(i: int) -> None:
            stock.load_table(name)

        def eos_open(i: int) -> None:
            ledger.run(
                f"lake/{label}/open/{i}", lambda eos: bool(eos.iceberg(name, properties=props))
            )

        sides = {
            "baseline": baseline,
            "eos": eos_side,
            "base_open": base_open,
            "eos_open": eos_open,
        }
        return sides, count, close

    from deltalake import DeltaTable, write_deltalake

    base_uri, eos_uri = f"{root}/delta-base/{label}", f"{root}/delta-eos/{label}"
    options = opts or None

    def baseline(i: int) -> None:
        write_deltalake(base_uri, data, mode="append", storage_options=options)

    def eos_side(i: int) -> None:
        ledger.run(
            f"lake/{label}/{i}", lambda eos: eos.delta(eos_uri, storage_options=opts).write(data)
        )

    def count() -> dict[str, int]:
        return {
            side: DeltaTable(uri, storage_options=options).to_pyarrow_dataset().count_rows()
            for side, uri in (("baseline", base_uri), ("eos", eos_uri))
        }

    def base_open(i: int) -> None:
        DeltaTable(base_uri, storage_options=options)

    def eos_open(i: int) -> None:
        ledger.run(
            f"lake/{label}/open/{i}",
            lambda eos: bool(eos.delta(eos_uri, storage_options=opts).prepare()),
        )

    sides = {"baseline": baseline, "eos": eos_side, "base_open": base_open, "eos_open": eos_open}
    return sides, count, lambda: None


def measure_one(
    fmt: str,
    backend: str,
    rows: int,
    rounds: int,
    ledger: Ledger,
    base_dsn: str,
    root: str,
    props: dict[str, str],
    opts: dict[str, str],
) -> dict[str, Any]:
    data = arrow_rows(rows)
    label = f"{fmt}_{backend}_{rows}_{secrets.token_hex(2)}"
    sides, count, close = _sides(fmt, ledger, base_dsn, root, props, opts, label, data)
    try:
        for side in ("baseline", "eos"):  # unmeasured: the first write (table files, caches)
            sides[side](-1)
        times: dict[str, list[float]] = {"baseline": [], "eos": []}
        for r in range(rounds):
            order = ["baseline", "eos"] if r % 2 == 0 else ["eos", "baseline"]
            for side in order:
                t0 = time.perf_counter()
                sides[side](r)
                times[side].append(time.perf_counter() - t0)
        # the fixed cost: opening the table (as written now), without writing, and an
        # effect that does nothing; interleaved the same way
        sides["empty_effect"] = lambda i: ledger.run(f"lake/{label}/empty/{i}", lambda eos: None)
        fixed: dict[str, list[float]] = {"base_open": [], "eos_open": [], "empty_effect": []}
        for r in range(rounds):
            order = list(fixed) if r % 2 == 0 else list(fixed)[::-1]
            for side in order:
                t0 = time.perf_counter()
                sides[side](r)
                fixed[side].append(time.perf_counter() - t0)
        counted = count()
    finally:
        close()
    expected = rows * (rounds + 1)
    if counted != {"baseline": expected, "eos": expected}:
        raise RuntimeError(f"{fmt} on {backend}, {rows:,} rows: counted {counted}, want {expected}")
    b, e = statistics.median(times["baseline"]), statistics.median(times["eos"])
    log(
        f"{PART[fmt]} {fmt:<7} {backend:<4} {rows:>9,} rows: baseline {b:.3f} s, "
        f"eos {e:.3f} s, ratio {e / b:.3f}"
    )
    return {
        "rows": rows,
        "rounds": rounds,
        "baseline_s": times["baseline"],
        "eos_s": times["eos"],
        "fixed_s": fixed,
        "rows_counted": counted,
    }


def measure(
    create_db: Callable[[str, bool], str],
    rows: list[int],
    rounds: int,
    backends: Sequence[str] = BACKENDS,
    formats: Sequence[str] = FORMATS,
) -> dict[str, Any]:
    """Raw seconds per format, backend and size: ``{fmt: {backend: [run, ...]}}``.
    ``create_db(label, ledger)`` returns the DSN of a new scratch database."""
    eos_dsn = create_db("lakeeos", True)
    base_dsn = create_db("lakebase", False)
    out: dict[str, Any] = {fmt: {} for fmt in formats}
    with Ledger(eos_dsn) as ledger, ExitStack() as stack:
        for backend in backends:
            scratch_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="eos-bench-lake-"))
            root, props, opts = stack.enter_context(storage(backend, scratch_dir))
            for n in sorted(rows):
                for fmt in formats:
                    run = measure_one(fmt, backend, n, rounds, ledger, base_dsn, root, props, opts)
                    out[fmt].setdefault(backend, []).append(run)
    return out


# --- figures from the raw results ---------------------------------------------------------


def summary(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per format, backend and size, medians and ratio; the goal rows (the largest
    size) carry the part's id."""
    rows = []
    for fmt in FORMATS:
        for backend in BACKENDS:
            runs = raw.get(fmt, {}).get(backend, [])
            if not runs:
                continue
            top = max(r["rows"] for r in runs)
            for run in sorted(runs, key=lambda r: r["rows"]):
                b = statistics.median(run["baseline_s"])
                e = statistics.median(run["eos_s"])
                goal_row = run["rows"] == top
                rows.append(
                    {
                        "id": PART[fmt] if goal_row else "",
                        "format": fmt,
                        "backend": backend,
                        "rows": run["rows"],
                        "rounds": run["rounds"],
                        "baseline_s": b,
                        "eos_s": e,
                        "ratio": e / b,
                        "goal": f"<= {GOAL}" if goal_row else "",
                        "met": (e / b <= GOAL) if goal_row else None,
                        "extra_ms": (e - b) * 1e3,
                        **{
                            f"{k}_ms": statistics.median(v) * 1e3
                            for k, v in run.get("fixed_s", {}).items()
                        },
                    }
                )
    return rows


def render(results: dict[str, Any], img_rel: str = "img") -> str:
    """The docs section (between the markers) from the raw results alone."""
    lines = [
        BEGIN_MARK,
        "<!-- written by benchmarks/bench_lakehouse.py from docs/results/lakehouse-bench.json;"
        " edit outside the markers -->",
        "",
        f"Command: `{results['command']}` — run {results['started'][:16].replace('T', ' ')} "
        f"UTC, {results['elapsed_s'] / 60:.0f} min.",
        "",
        f"Environment: {results['environment']}.",
        "",
        "| figure | format | storage | rows | baseline, median | exactly-once, median "
        "| ratio | difference | goal | met? | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary(results["raw"]):
        met = "" if s["met"] is None else ("yes" if s["met"] else "NO")
        ratio = f"{s['ratio']:.3f}"
        lines.append(
            f"| {s['id']} | {s['format']} | {s['backend']} | {s['rows']:,} "
            f"| {s['baseline_s']:.3f} s | {s['eos_s']:.3f} s "
            f"| {f'**{ratio}**' if s['id'] else ratio} | {s['extra_ms']:+.0f} ms "
            f"| {s['goal'].replace('<=', '≤')} | {met} | {s['rounds']} |"
        )
    fixed = [s for s in summary(results["raw"]) if "eos_open_ms" in s]
    if fixed:
        lines += [
            "",
            "The fixed cost, medians of the same number of rounds after the writes, on the "
            "tables as written: opening the table without writing, by the library alone "
            "(`SqlCatalog.load_table`, `DeltaTable(uri)`) and in an effect (`eos.iceberg(...)`; "
            "`eos.delta(...).prepare()`, which also reads the key's marker), and an effect that "
            "does nothing:",
            "",
            "| format | storage | rows | library opens the table | effect opening the table "
            "| empty effect | effect opening − empty effect − library opening |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in fixed:
            lines.append(
                f"| {s['format']} | {s['backend']} | {s['rows']:,} | {s['base_open_ms']:.1f} ms "
                f"| {s['eos_open_ms']:.1f} ms | {s['empty_effect_ms']:.1f} ms "
                f"| {s['eos_open_ms'] - s['empty_effect_ms'] - s['base_open_ms']:+.1f} ms |"
            )
    lines += [
        "",
        f"![Write time against rows, baseline and exactly-once]({img_rel}/{PLOT})",
        END_MARK,
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], img_dir: Path, name: str = PLOT) -> str:
    """Write the plot of ``results`` as ``img_dir/name``; return ``name``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = results["raw"]
    img_dir.mkdir(parents=True, exist_ok=True)
    fmts = [f for f in FORMATS if raw.get(f)]
    fig, axes = plt.subplots(1, len(fmts), figsize=(5.2 * len(fmts), 3.9), squeeze=False)
    for ax, fmt in zip(axes[0], fmts, strict=True):
        for k, backend in enumerate(b for b in BACKENDS if raw[fmt].get(b)):
            runs = sorted(raw[fmt][backend], key=lambda r: r["rows"])
            ns = [r["rows"] for r in runs]
            for side, marker, style in (("baseline", "o", "--"), ("eos", "s", "-")):
                ax.plot(
                    ns,
                    [statistics.median(r[f"{side}_s"]) for r in runs],
                    marker=marker,
                    ls=style,
                    color=f"C{k}",
                    label=f"{backend}: {'plain ' + fmt if side == 'baseline' else 'exactly-once'}",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows per write")
        ax.set_ylabel("seconds per write, median")
        ax.set_title(f"{PART[fmt]}: {fmt} ({MEASURED[fmt].split(' in ')[0]})", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img_dir / name, dpi=110)
    plt.close(fig)
    return name


def write_docs(path: Path, results: dict[str, Any], img_dir: Path) -> None:
    block = render(results, os.path.relpath(img_dir, path.parent))
    text = path.read_text() if path.exists() else "# Performance\n"
    if BEGIN_MARK in text and END_MARK in text:
        text = re.sub(
            re.escape(BEGIN_MARK) + ".*?" + re.escape(END_MARK), lambda _: block, text, flags=re.S
        )
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def environment(admin: str) -> str:
    import deltalake
    import pyarrow
    import pyiceberg

    with psycopg.connect(admin) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
    return (
        f"PostgreSQL {version} on loopback (synchronous_commit={sync}); pyiceberg "
        f"{pyiceberg.__version__}, deltalake {deltalake.__version__}, pyarrow "
        f"{pyarrow.__version__}; Python {platform.python_version()}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end; S3 API: moto's server on loopback"
    )


# --- standalone -----------------------------------------------------------------------------


class Databases:
    def __init__(self, admin: str) -> None:
        self.admin = admin
        self.token = secrets.token_hex(4)
        self.names: list[str] = []

    def create(self, label: str, ledger: bool) -> str:
        name = f"eos_bench_{label}_{self.token}"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.names.append(name)
        dsn = conninfo.make_conninfo(self.admin, dbname=name)
        if ledger:
            migrate(dsn)
        return dsn

    def drop_all(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            for name in self.names:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def sizes(rows: str, max_rows: int | None) -> list[int]:
    wanted = sorted({int(x.replace("_", "")) for x in rows.split(",") if x.strip()})
    if max_rows is not None:
        wanted = [n for n in wanted if n <= max_rows] or [max_rows]
    return wanted


def main(argv: list[str] | None = None) -> int:
    import logging

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", help="admin DSN (scratch databases are created through it)")
    ap.add_argument("--rows", default="10000,100000,1000000", help="sizes, comma-separated")
    ap.add_argument("--max-rows", type=int, help="leave out sizes above this")
    ap.add_argument("--rounds", type=int, default=5, help="writes per side and size")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--docs", type=Path, help="rewrite this file's lakehouse section")
    ap.add_argument("--img-dir", type=Path, help="write the plot here")
    ap.add_argument("--from-json", type=Path, help="render a recorded run; measure nothing")
    args = ap.parse_args(argv)
    for name in ("eos_airflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        bad = sorted(set(backends) - set(BACKENDS)) + sorted(set(formats) - set(FORMATS))
        if bad or args.rounds < 1:
            ap.error(
                f"choose backends from {', '.join(BACKENDS)}, formats from "
                f"{', '.join(FORMATS)}, --rounds >= 1 (got {', '.join(bad) or args.rounds})"
            )
        admin = (
            args.dsn
            or os.environ.get("EOS_BENCH_DSN")
            or os.environ.get("EOS_TEST_DSN")
            or "postgresql://postgres@127.0.0.1/postgres"
        )
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        dbs = Databases(admin)
        try:
            raw = measure(
                dbs.create, sizes(args.rows, args.max_rows), args.rounds, backends, formats
            )
        finally:
            dbs.drop_all()
        results = {
            "command": "python benchmarks/bench_lakehouse.py"
            + "".join(" " + a for a in (argv if argv is not None else sys.argv[1:])),
            "started": started.isoformat(),
            "elapsed_s": time.perf_counter() - t0,
            "environment": environment(admin),
            "raw": raw,
        }
    for s in summary(results["raw"]):
        met = "" if s["met"] is None else ("yes" if s["met"] else "NO")
        print(
            f"{s['id']:<4} {s['format']:<8} {s['backend']:<5} {s['rows']:>10,} rows  "
            f"baseline {s['baseline_s']:8.3f} s  eos {s['eos_s']:8.3f} s  "
            f"ratio {s['ratio']:.3f}  {s['goal']:<8} {met}"
        )
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.img_dir:
        plot(results, args.img_dir)
    if args.docs:
        write_docs(args.docs, results, args.img_dir or args.docs.parent / "img")
    return 0


if __name__ == "__main__":
    sys.exit(main())
