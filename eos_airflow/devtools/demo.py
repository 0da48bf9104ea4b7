"""Faces tier: ``eos-airflow demo``: the example DAGs through real Airflow, with injected crashes.

Runs ``dags/eos_sales_daily.py`` and its plain twin ``dags/plain_sales_daily.py`` with
``airflow dags test`` under the same failures, then prints what the ledger prevented. Then
the three example uses, each under its own failure (see :mod:`eos_airflow.devtools.demo_examples`):
``eos_analytics_daily`` (a chunked load that crashes mid-load and resumes, then a re-run of
the day that replaces it), ``eos_iot_readings`` (Kafka ingest and outbox alerts, crashing
during the ingest) and ``eos_bank_transfer`` (two-phase commit killed after its decision,
then recovered). Uses the database from --dsn / EOS_LEDGER_DSN, or starts an embedded
PostgreSQL. Nothing else needs to run: Kafka is librdkafka's mock cluster, owned by this
process; NATS JetStream is used when a server listens on ``EOS_DEMO_NATS_URL`` (default
``nats://127.0.0.1:4222``; empty: never), otherwise the alerts go to Kafka only.

Retries: the example DAGs wait a minute between tries, as production DAGs do; the demo's
Airflow shortens every task's ``retry_delay`` to :data:`DEMO_RETRY_DELAY` with a cluster
policy (``airflow_local_settings.py`` in its ``AIRFLOW_HOME/config``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from eos_airflow.errors import ConfigurationError
from eos_airflow.ledger.chain import verify
from eos_airflow.ledger.migrate import migrate

WAREHOUSE_DB, AIRFLOW_DB = "eos_demo_warehouse", "eos_demo_airflow"
#: The example uses run meanwhile, in a warehouse and an Airflow metadata database of their own.
EXAMPLES_DB, EXAMPLES_AIRFLOW_DB = "eos_demo_examples", "eos_demo_airflow_examples"
DAYS = ("2024-01-01", "2024-01-02", "2024-01-03")

#: (title, DAG logical date, EOS_FAILPOINTS, what happens)
SCENARIOS = (
    (
        "crash after the commit, Airflow retries",
        "2024-01-01T00:00:00+00:00",
        "after_commit@1=raise",
        "try 1 commits, then fails before Airflow records success; try 2 runs",
    ),
    (
        "crash in the middle of the write",
        "2024-01-02T00:00:00+00:00",
        "before_commit@1=raise",
        "try 1 wrote rows but fails before its commit; try 2 runs",
    ),
    (
        "worker killed right after the commit",
        "2024-01-03T00:00:00+00:00",
        "after_commit=exit",
        "the process dies (SIGKILL-like) after the commit; the run is left unfinished",
    ),
    (
        "the same day triggered again",
        "2024-01-03T12:00:00+00:00",
        None,
        "a new DAG run for a day that is already loaded",
    ),
)

console = Console()


def _dags_folder() -> Path:
    folder = Path(__file__).resolve().parent / "dags"
    if not (folder / "eos_sales_daily.py").exists():
        raise ConfigurationError(
            f"the example DAGs are missing from the installed package ({folder}): "
            "reinstall eos-airflow"
        )
    return folder


def _server(args: argparse.Namespace, workdir: Path) -> tuple[str, Any]:
    dsn = args.dsn or os.environ.get("EOS_LEDGER_DSN")
    if dsn:
        return dsn, None
    from eos_airflow.devtools.embedded import start_embedded

    console.print("[dim]no database configured: starting an embedded PostgreSQL…[/dim]")
    server = start_embedded(workdir / "pgdata")
    return server.dsn, server


def _fresh_database(admin_dsn: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(create)
    return psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)


def _airflow_env(workdir: Path, meta_dsn: str, warehouse_dsn: str) -> dict[str, str]:
    from eos_airflow.hooks.ledger import airflow_conn_json, sqlalchemy_url

    env = {
        **os.environ,
        "AIRFLOW_HOME": str(workdir / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(_dags_folder()),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sqlalchemy_url(meta_dsn),
        "AIRFLOW_CONN_EOS_WAREHOUSE": airflow_conn_json(warehouse_dsn),
    }
    env.pop("EOS_FAILPOINTS", None)
    config = workdir / "airflow" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "airflow_local_settings.py").write_text(RETRY_POLICY.format(DEMO_RETRY_DELAY))
    return env


#: Seconds between tries in the demo's Airflow (the example DAGs ask for up to a minute).
DEMO_RETRY_DELAY = 1
RETRY_POLICY = """\
# written by eos-airflow demo: short retry delays, so that the demo does not wait minutes
from datetime import timedelta


def task_policy(task):
    task.retry_delay = min(task.retry_delay, timedelta(seconds={}))
"""


def _airflow(env: dict[str, str], log: Path, *argv: str, failpoints: str | None = None) -> int:
    run_env = dict(env)
    if failpoints:
        run_env["EOS_FAILPOINTS"] = failpoints
    airflow = shutil.which("airflow", path=str(Path(sys.executable).parent)) or "airflow"
    with log.open("a") as out:
        out.write(f"\n$ EOS_FAILPOINTS={failpoints or ''} airflow {' '.join(argv)}\n")
        out.flush()
        return subprocess.run(
            [airflow, *argv], env=run_env, stdout=out, stderr=subprocess.STDOUT, timeout=600
        ).returncode


def _setup_warehouse(dsn: str) -> None:
    # the example DAG's SETUP_SQL, read as text: importing the DAG file would import Airflow
    source = (_dags_folder() / "eos_sales_daily.py").read_text()
    setup_sql = source.split('SETUP_SQL = """', 1)[1].split('"""', 1)[0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(setup_sql)
        conn.execute("CREATE TABLE sales_daily_plain (LIKE sales_daily)")
        with conn.cursor().copy("COPY sales_raw (day, region, amount) FROM STDIN") as copy:
            for n, day in enumerate(DAYS):
                for region, amount in (("eu", 120 + n), ("us", 340 + n), ("apac", 75 + n)):
                    copy.write_row((day, region, amount))
    migrate(dsn)


def _counts(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        eos: dict[str, int] = dict(
            conn.execute("SELECT day::text, count(*) FROM sales_daily GROUP BY 1").fetchall()
        )
        plain: dict[str, int] = dict(
            conn.execute("SELECT day::text, count(*) FROM sales_daily_plain GROUP BY 1").fetchall()
        )
        totals: dict[str, int] = dict(
            conn.execute("SELECT day::text, count(*) FROM sales_totals GROUP BY 1").fetchall()
        )
        events: dict[str, int] = dict(
            conn.execute(
                "SELECT event::text, count(*) FROM eos.ledger_events GROUP BY 1"
            ).fetchall()
        )
        chain = verify(conn)
    return {"eos": eos, "plain": plain, "totals": totals, "events": events, "chain": chain}


def run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "airflow.log"
    log.write_text("")
    admin_dsn, server = _server(args, workdir)
    finish_examples: Callable[..., bool] | None = None
    try:
        warehouse = _fresh_database(admin_dsn, WAREHOUSE_DB)
        meta = _fresh_database(admin_dsn, AIRFLOW_DB)
        _setup_warehouse(warehouse)
        env = _airflow_env(workdir, meta, warehouse)
        console.print(
            "[bold]eos-airflow demo[/bold]: daily sales loads and the example uses "
            f"through real Airflow (airflow dags test), logs in {log}"
        )
        console.print("preparing Airflow's metadata database…")
        if _airflow(env, log, "db", "migrate") != 0:
            raise ConfigurationError(f"airflow db migrate failed; see {log}")
        examples, finish_examples = _start_examples(admin_dsn, env, workdir)
        console.print(
            "[dim]the three example uses run meanwhile (their report follows the "
            "sales report)[/dim]"
        )
        for title, logical_date, fp, what in SCENARIOS:
            console.print(f"\n[bold cyan]▶ {title}[/bold cyan] — {what}")
            for dag_id in ("eos_sales_daily", "plain_sales_daily"):
                code = _airflow(env, log, "dags", "test", dag_id, logical_date, failpoints=fp)
                outcome = {0: "run succeeded", 137: "process killed (exit 137)"}.get(
                    code, f"run failed (exit {code})"
                )
                console.print(f"  {dag_id:<18} {outcome}")
        _report(_counts(warehouse))
        ok = finish_examples()
        console.print(
            f"\n[dim]finished in {time.monotonic() - started:.0f} s; inspect the "
            f"ledger with: eos-airflow ledger list --dsn '{warehouse}' (sales) or "
            f"--dsn '{examples}' (analytics, IoT)[/dim]"
        )
        return 0 if ok else 1
    finally:
        if finish_examples is not None:  # wait for them before the server stops under them
            with contextlib.suppress(Exception):
                finish_examples(timeout=600)
        if server is not None:
            server.stop()


def _start_examples(
    admin_dsn: str, env: dict[str, str], workdir: Path
) -> tuple[str, Callable[..., bool]]:
    """Start the example uses (:mod:`eos_airflow.devtools.demo_examples`) in a thread, with their
    own warehouse, Airflow metadata database (a copy of the migrated one) and log; return
    the warehouse DSN and ``finish()``, which waits for them and prints their report (once)."""
    from eos_airflow.devtools import demo_examples
    from eos_airflow.hooks.ledger import airflow_conn_json, sqlalchemy_url

    warehouse = _fresh_database(admin_dsn, EXAMPLES_DB)
    migrate(warehouse)
    meta = _fresh_database(admin_dsn, EXAMPLES_AIRFLOW_DB, template=AIRFLOW_DB)
    lane_env = {
        **env,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sqlalchemy_url(meta),
        "AIRFLOW_CONN_EOS_WAREHOUSE": airflow_conn_json(warehouse),
    }
    log = workdir / "airflow-examples.log"
    log.write_text("")
    buffer = io.StringIO()
    out = Console(file=buffer, force_terminal=console.is_terminal, width=console.width)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["ok"] = demo_examples.run_examples(
                admin_dsn,
                warehouse,
                lane_env,
                log,
                out=out,
                run=lambda *argv, failpoints=None: _airflow(
                    lane_env, log, *argv, failpoints=failpoints
                ),
            )
        except BaseException as exc:  # reported by finish()
            result["error"] = exc

    thread = threading.Thread(target=work, name="eos-demo-examples", daemon=True)
    thread.start()

    def finish(timeout: float | None = None) -> bool:
        thread.join(timeout)
        if "printed" not in result:
            result["printed"] = True
            console.file.write(buffer.getvalue())
            console.file.flush()
        if "error" in result:
            raise result.pop("error")
        return bool(result.get("ok"))

    return warehouse, finish


def _report(c: dict[str, Any]) -> None:
    table = Table(title="rows per day in the target table (3 regions per day is correct)")
    table.add_column("day")
    table.add_column("plain @task", justify="right")
    table.add_column("@task.exactly_once", justify="right")
    table.add_column("totals (ExactlyOnceSQLOperator)", justify="right")
    for day in DAYS:
        plain, eos = c["plain"].get(day, 0), c["eos"].get(day, 0)
        table.add_row(
            day,
            f"[red]{plain}[/red]" if plain != 3 else str(plain),
            f"[green]{eos}[/green]" if eos == 3 else f"[red]{eos}[/red]",
            str(c["totals"].get(day, 0)),
        )
    console.print()
    console.print(table)
    events = c["events"]
    duplicates = sum(c["plain"].values()) - sum(c["eos"].values())
    console.print(
        f"The ledger committed {events.get('committed', 0)} effects, skipped "
        f"{events.get('skipped', 0)} repeated runs (the work and its write did not run again), "
        f"rolled back {events.get('failed', 0)} failed attempts and fenced "
        f"{events.get('fenced', 0)}."
    )
    console.print(
        f"Without the ledger the same failures wrote [red]{duplicates}[/red] duplicate rows."
    )
    chain = c["chain"]
    status = "[green]intact[/green]" if chain.ok else f"[red]BROKEN: {chain.first_problem}[/red]"
    console.print(f"Audit trail: {chain.events} hash-chained events, {status}.")
