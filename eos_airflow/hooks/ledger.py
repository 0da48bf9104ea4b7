"""Adapters tier: connections to a ledger database through Airflow's Postgres connection type."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg

from eos_airflow.errors import ConfigurationError
from eos_airflow.ledger import connection

#: Connection extras the lakehouse operators read (eos_airflow/operators/lakehouse.py).
LAKEHOUSE_EXTRAS = frozenset({"iceberg_warehouse", "iceberg_properties", "delta_storage_options"})


def connect_factory(
    conn_id: str,
    *,
    liveness_timeout: float | None = None,
) -> Callable[[], psycopg.Connection[Any]]:
    """A function opening autocommit psycopg 3 connections for Airflow connection ``conn_id``.

    The connection (host, login, password, extras such as sslmode) is read through
    ``PostgresHook``, so secrets backends and ``AIRFLOW_CONN_*`` variables work as usual.
    Each connection gets the server-side liveness settings of ``liveness_timeout`` (default
    ``[eos_airflow] liveness_timeout``, else ``EOS_LIVENESS_TIMEOUT``, else 60 s; see
    eos_airflow/ledger/connection.py). A failure to connect raises the retryable
    ``DatabaseUnavailableError`` when another try may succeed (server down, restarting, full)
    and ``ConfigurationError`` when it cannot (unknown connection id, wrong password, role or
    database).
    """
    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from eos_airflow import config

    if liveness_timeout is None:
        liveness_timeout = config.liveness_timeout()
    liveness = connection.Liveness.of(liveness_timeout)
    hook = PostgresHook(postgres_conn_id=conn_id)
    # settings of the lakehouse operators, not libpq parameters
    hook.ignored_extra_options = hook.ignored_extra_options | LAKEHOUSE_EXTRAS
    where = f"Airflow connection {conn_id!r}"

    def connect() -> psycopg.Connection[Any]:
        try:
            conn = hook.get_conn()
        except AirflowNotFoundException:
            raise ConfigurationError(
                f"Airflow connection {conn_id!r} is not defined; create it, e.g. "
                f"`airflow connections add {conn_id} --conn-uri postgresql://USER@HOST/DB` "
                f"or set AIRFLOW_CONN_{conn_id.upper()}"
            ) from None
        except psycopg.Error as exc:
            raise connection.connect_error(exc, where) from exc
        if not isinstance(conn, psycopg.Connection):
            conn.close()
            raise ConfigurationError(
                f"connection {conn_id!r} did not give a psycopg 3 connection "
                f"({type(conn).__module__}.{type(conn).__name__}); eos-airflow needs psycopg 3 "
                "and SQLAlchemy 2 installed next to apache-airflow-providers-postgres"
            )
        return connection.prepare(conn, liveness, where=where)

    return connect


def conninfo(connection: Any) -> str:
    """A libpq connection string for an Airflow ``postgres`` connection object (as returned
    by ``await BaseHook.aget_connection``); extras that are libpq parameters (``sslmode``, …)
    are kept. Used by the trigger, which must not call the blocking hook."""
    known = {option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults()}
    params: dict[str, Any] = {
        key: value for key, value in (connection.extra_dejson or {}).items() if key in known
    }
    params.update(
        host=connection.host or None,
        port=connection.port or None,
        user=connection.login or None,
        password=connection.password or None,
        dbname=connection.schema or None,
    )
    return psycopg.conninfo.make_conninfo(
        **{key: value for key, value in params.items() if value is not None}
    )


def airflow_conn_json(dsn: str) -> str:
    """The ``AIRFLOW_CONN_<ID>`` value (JSON form, which also carries Unix-socket hosts) of a
    ``postgres`` connection to the database named by a libpq ``dsn``."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    conn: dict[str, Any] = {
        "conn_type": "postgres",
        "host": params.get("host", "127.0.0.1"),
        "login": params.get("user", "postgres"),
        "schema": params["dbname"],
    }
    port = params.get("port")
    if port:
        conn["port"] = int(port)
    if params.get("password"):
        conn["password"] = params["password"]
    return json.dumps(conn)


def sqlalchemy_url(dsn: str) -> str:
    """A ``postgresql+psycopg://`` URL (Airflow's metadata database setting) for ``dsn``."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(params.get("host", "127.0.0.1"))
    user = params.get("user", "postgres")
    if host.startswith("/"):
        return f"postgresql+psycopg://{user}@/{params['dbname']}?host={host}"
    return f"postgresql+psycopg://{user}@{host}:{params.get('port', 5432)}/{params['dbname']}"
