"""Adapters tier: ``LedgerTrigger``: waits in the triggerer until effects are committed.

A thin adapter over :mod:`eos_airflow.ledger.watch`: every LedgerTrigger of a triggerer
process on the same database and schema shares one listening connection and one poll.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from eos_airflow.errors import EosError
from eos_airflow.hooks.ledger import conninfo
from eos_airflow.ledger.watch import DEFAULT_POLL_INTERVAL, WaitSpec, shared_watcher


class LedgerTrigger(BaseTrigger):
    """Fire once every key in ``keys`` (and ``min_count`` keys under ``prefix``) is committed.

    :param conn_id: Airflow Postgres connection of the database holding the ledger.
    :param keys: effect keys that must all be committed.
    :param prefix: a key prefix; at least ``min_count`` committed keys must start with it.
    :param min_count: see ``prefix`` (default 1).
    :param schema: the ledger schema (default ``eos``).
    :param poll_interval: seconds between polls, the fallback for a missed notification.
    :param fail_on_failed: fire a ``failed`` event when a key's last attempt failed.
    :param deadline: UNIX time after which the trigger fires a ``timeout`` event (the
        triggerer enforces the sensor's timeout too; ``airflow dags test`` relies on this).

    The event payload is :meth:`eos_airflow.ledger.watch.Verdict.to_payload`: ``status``
    (``committed``, ``failed``, ``timeout`` or ``error``), ``results`` ({key: result}),
    ``missing``, ``failed`` and ``message``.
    """

    def __init__(
        self,
        *,
        conn_id: str,
        keys: Sequence[str] = (),
        prefix: str | None = None,
        min_count: int | None = None,
        schema: str = "eos",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        fail_on_failed: bool = True,
        deadline: float | None = None,
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.keys = list(keys)
        self.prefix = prefix
        self.min_count = min_count
        self.schema = schema
        self.poll_interval = poll_interval
        self.fail_on_failed = fail_on_failed
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "eos_airflow.triggers.ledger.LedgerTrigger",
            {
                "conn_id": self.conn_id,
                "keys": list(self.keys),
                "prefix": self.prefix,
                "min_count": self.min_count,
                "schema": self.schema,
                "poll_interval": self.poll_interval,
                "fail_on_failed": self.fail_on_failed,
                "deadline": self.deadline,
            },
        )

    def spec(self) -> WaitSpec:
        return WaitSpec(
            keys=tuple(self.keys),
            prefix=self.prefix,
            min_count=self.min_count or 1,
            fail_on_failed=self.fail_on_failed,
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            spec = self.spec()
            connection = await BaseHook.aget_connection(self.conn_id)
        except AirflowNotFoundException:
            yield TriggerEvent(
                {
                    "status": "error",
                    "message": (
                        f"Airflow connection {self.conn_id!r} is not defined; create it, e.g. "
                        f"`airflow connections add {self.conn_id} --conn-uri postgresql://USER@HOST/DB`"
                        f" or set AIRFLOW_CONN_{self.conn_id.upper()}"
                    ),
                }
            )
            return
        except EosError as exc:
            yield TriggerEvent({"status": "error", "message": str(exc)})
            return
        timeout = None if self.deadline is None else max(0.0, self.deadline - time.time())
        watcher = shared_watcher(
            conninfo(connection), self.schema, poll_interval=self.poll_interval
        )
        self.log.info("waiting for %s (watcher %r)", spec, watcher)
        verdict = await watcher.wait(spec, timeout=timeout, poll_interval=self.poll_interval)
        yield TriggerEvent(verdict.to_payload())
