"""Connections to a ledger database through Airflow's Postgres connection type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from eos_airflow.errors import ConfigurationError


def connect_factory(conn_id: str) -> Callable[[], psycopg.Connection[Any]]:
    """A function opening autocommit psycopg 3 connections for Airflow connection ``conn_id``.

    The connection (host, login, password, extras such as sslmode) is read through
    ``PostgresHook``, so secrets backends and ``AIRFLOW_CONN_*`` variables work as usual.
    """
    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    hook = PostgresHook(postgres_conn_id=conn_id)

    def connect() -> psycopg.Connection[Any]:
        try:
            conn = hook.get_conn()
        except AirflowNotFoundException:
            raise ConfigurationError(
                f"Airflow connection {conn_id!r} is not defined; create it, e.g. "
                f"`airflow connections add {conn_id} --conn-uri postgresql://USER@HOST/DB` "
                f"or set AIRFLOW_CONN_{conn_id.upper()}"
            ) from None
        except psycopg.OperationalError as exc:
            raise ConfigurationError(
                f"cannot connect to Airflow connection {conn_id!r}: {str(exc).strip()}; "
                "check its host, port, login and database"
            ) from exc
        if not isinstance(conn, psycopg.Connection):
            conn.close()
            raise ConfigurationError(
                f"connection {conn_id!r} did not give a psycopg 3 connection "
                f"({type(conn).__module__}.{type(conn).__name__}); eos-airflow needs psycopg 3 "
                "and SQLAlchemy 2 installed next to apache-airflow-providers-postgres"
            )
        conn.autocommit = True
        return conn

    return connect
