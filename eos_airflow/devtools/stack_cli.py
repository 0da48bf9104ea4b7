"""Faces tier: ``eos-airflow stack up``: Airflow's compose topology as local processes, in the
foreground.

Starts api-server, scheduler, dag-processor and triggerer (and Celery workers with
``--executor celery``) from the installed packages, with this package's DAGs folder and the
ledger database as the ``eos_warehouse`` connection, until Ctrl-C stops them all.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from eos_airflow.devtools.stack import EXECUTORS, AirflowStack
from eos_airflow.errors import ConfigurationError
from eos_airflow.hooks.ledger import airflow_conn_json


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    stack = sub.add_parser(
        "stack",
        help="run Airflow's services locally (api-server, "
        "scheduler, dag-processor, triggerer, Celery workers)",
    ).add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    up = stack.add_parser("up", parents=[common], help="start the services until Ctrl-C")
    up.add_argument(
        "--metadata-url",
        default=os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"),
        help="Airflow metadata database (postgresql+psycopg://...; default: "
        "$AIRFLOW__DATABASE__SQL_ALCHEMY_CONN)",
    )
    up.add_argument("--dags-folder", default="dags", help="DAGs folder (default: ./dags)")
    up.add_argument("--home", default=".eos-stack", help="AIRFLOW_HOME (default: .eos-stack)")
    up.add_argument("--executor", choices=sorted(EXECUTORS), default="local")
    up.add_argument("--workers", type=int, default=2, help="Celery workers (default: 2)")
    up.add_argument(
        "--broker-url",
        default="redis://127.0.0.1:6379/0",
        help="Celery broker (default: redis://127.0.0.1:6379/0)",
    )
    up.add_argument("--port", type=int, default=8080, help="api-server port (default: 8080)")
    up.set_defaults(func=cmd_stack_up)


def ledger_dsn(args: argparse.Namespace) -> str | None:
    """The ledger database that becomes the stack's ``eos_warehouse`` connection: ``--dsn``,
    ``--conn-id`` (read here through Airflow's connection lookup: ``AIRFLOW_CONN_*``, a
    secrets backend or this environment's metadata database) or ``EOS_LEDGER_DSN``."""
    if args.dsn:
        return str(args.dsn)
    if args.conn_id:
        from airflow.providers.postgres.hooks.postgres import PostgresHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        from eos_airflow.hooks.ledger import conninfo

        try:
            return conninfo(PostgresHook.get_connection(args.conn_id))
        except AirflowNotFoundException:
            raise ConfigurationError(
                f"Airflow connection {args.conn_id!r} is not defined; create it or set "
                f"AIRFLOW_CONN_{args.conn_id.upper()}, or pass --dsn"
            ) from None
    return os.environ.get("EOS_LEDGER_DSN")


def cmd_stack_up(args: argparse.Namespace) -> int:
    if not args.metadata_url:
        raise ConfigurationError(
            "no metadata database: pass --metadata-url postgresql+psycopg://USER@HOST/DB "
            "(an empty database is migrated) or set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
        )
    folder = Path(args.dags_folder).resolve()
    if not folder.is_dir():
        raise ConfigurationError(f"DAGs folder {str(folder)!r} does not exist; pass --dags-folder")
    env = {}
    dsn = ledger_dsn(args)
    if dsn:
        env["AIRFLOW_CONN_EOS_WAREHOUSE"] = airflow_conn_json(dsn)
    stack = AirflowStack(
        args.home,
        args.metadata_url,
        folder,
        executor=args.executor,
        workers=args.workers,
        broker_url=args.broker_url,
        port=args.port,
        env=env,
    )
    print(
        f"starting {', '.join(stack.components())} ({EXECUTORS[args.executor]}); "
        f"logs in {stack.log_dir}",
        flush=True,
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with stack.start():
        print(
            f"Airflow is up: http://127.0.0.1:{stack.port}  (Ctrl-C stops every service)",
            flush=True,
        )
        while not stop:
            dead = [name for name, alive in stack.running().items() if not alive]
            if dead:
                print(f"stopped unexpectedly: {', '.join(dead)}; see {stack.log_dir}", flush=True)
                return 1
            time.sleep(1)
    print("stopped", flush=True)
    return 0
