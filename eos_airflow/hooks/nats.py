"""Adapters tier: ``NatsHook``, the Airflow connection type ``nats`` of the outbox relay.

eos-airflow registers the type through its provider info (``connection-types``, with the
form's labels as ``ui-field-behaviour``), so Airflow knows it: the connection form offers
"NATS" with its fields labelled, and
``AIRFLOW_CONN_<ID>='nats://user:password@host:4222'`` names a known type.
``OutboxRelayOperator(nats_conn_id=...)`` reads the servers through it; a connection of
another type (``generic``) with the same fields works too.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from eos_airflow.errors import ConfigurationError
from eos_airflow.relay.sinks import NatsCredentials

#: NATS's client port, when the connection gives none.
DEFAULT_PORT = 4222


class NatsHook(BaseHook):
    """The NATS servers of an Airflow connection: host and port (or ``{"servers": [...]}``
    in the extra, for a cluster), login and password (both: user and password; one alone: a
    token)."""

    conn_name_attr = "nats_conn_id"
    default_conn_name = "nats_default"
    conn_type = "nats"
    hook_name = "NATS"

    def __init__(self, nats_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nats_conn_id = nats_conn_id

    def get_conn(self) -> list[str]:
        return self.servers()

    def servers(self) -> list[str]:
        """The server URLs. Login and password become percent-encoded user info;
        :class:`~eos_airflow.relay.sinks.NatsSink` takes them out of the URL again and hands
        them to nats-py as options."""
        from airflow.sdk.exceptions import AirflowNotFoundException

        conn_id = self.nats_conn_id
        try:
            connection = self.get_connection(conn_id)
        except AirflowNotFoundException:
            raise ConfigurationError(
                f"Airflow connection {conn_id!r} is not defined; create it, e.g. "
                f"AIRFLOW_CONN_{conn_id.upper()}='nats://HOST:{DEFAULT_PORT}'"
            ) from None
        servers = (connection.extra_dejson or {}).get("servers")
        if servers:
            return [servers] if isinstance(servers, str) else list(servers)
        if not connection.host:
            raise ConfigurationError(
                f"Airflow connection {conn_id!r} has no host (or extra "
                "'servers'); set the NATS server's host and port"
            )
        # percent-encoded: a password with "/", "#", "?" or "@" stays inside the user info
        if connection.login and connection.password:
            credentials = NatsCredentials(user=connection.login, password=connection.password)
        elif connection.login or connection.password:  # a single secret: token authentication
            credentials = NatsCredentials(token=connection.login or connection.password)
        else:
            credentials = NatsCredentials()
        port = connection.port or DEFAULT_PORT
        return [credentials.url(f"nats://{connection.host}:{port}")]


__all__ = ["DEFAULT_PORT", "NatsHook"]
