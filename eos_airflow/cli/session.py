"""Faces tier: how every ``eos-airflow`` command opens the ledger database.

The database comes from ``--dsn``, ``--conn-id`` (an Airflow connection) or ``EOS_LEDGER_DSN``;
a connection that cannot be opened is :class:`~eos_airflow.errors.DatabaseUnavailableError`
(exit 3), whichever way it was named.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import psycopg

from eos_airflow.errors import ConfigurationError, DatabaseUnavailableError


def connect_factory(args: argparse.Namespace) -> Callable[[], psycopg.Connection[Any]]:
    dsn = args.dsn or (None if args.conn_id else os.environ.get("EOS_LEDGER_DSN"))
    if dsn:
        from eos_airflow.api import check_dsn
        from eos_airflow.ledger.connection import connect

        check_dsn(dsn)
        return _unreachable_is_exit_3(lambda: connect(dsn, application_name="eos-airflow cli"))
    if args.conn_id:
        from eos_airflow.hooks.ledger import connect_factory as airflow_connection

        return _unreachable_is_exit_3(airflow_connection(args.conn_id))
    raise ConfigurationError(
        "no ledger database given: pass --dsn postgresql://..., --conn-id AIRFLOW_CONN_ID, "
        "or set EOS_LEDGER_DSN"
    )


def _unreachable_is_exit_3(
    connect: Callable[[], psycopg.Connection[Any]],
) -> Callable[[], psycopg.Connection[Any]]:
    """Any failed connection attempt exits 3 ("database unreachable"), also those another
    try cannot fix (wrong password, unknown database): their message says what to fix."""

    def opened() -> psycopg.Connection[Any]:
        try:
            return connect()
        except ConfigurationError as exc:
            if isinstance(exc.__cause__, psycopg.Error):
                raise DatabaseUnavailableError(str(exc)) from exc
            raise

    return opened


def open_connection(args: argparse.Namespace) -> psycopg.Connection[Any]:
    connect = connect_factory(args)
    try:
        conn = connect()
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailableError(
            f"cannot connect to the ledger database: {exc}".strip()
        ) from exc
    conn.autocommit = True
    return conn


class checked:
    """Open the ledger database and check that the schema is this package's revision."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __enter__(self) -> psycopg.Connection[Any]:
        from eos_airflow.ledger.migrate import check_revision

        self.conn = open_connection(self.args)
        try:
            check_revision(self.conn, self.args.schema)
        except BaseException:
            self.conn.close()
            raise
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


__all__ = ["checked", "connect_factory", "open_connection"]
