"""Adapters tier: provider metadata read by Airflow through the ``apache_airflow_provider`` entry
point.

Kept import-light: Airflow calls this for every command, so it must not import Airflow.
"""

from __future__ import annotations

from typing import Any

#: First version with the ``[eos_airflow]`` options below.
_CONFIG_ADDED = "0.1.0"


def _option(description: str, type_: str, default: str | None, example: str | None) -> dict:
    return {
        "description": description,
        "version_added": _CONFIG_ADDED,
        "type": type_,
        "example": example,
        "default": default,
    }


#: The ``[eos_airflow]`` section (``airflow config list --section eos_airflow``); read and
#: checked by eos_airflow/config.py, whose defaults equal these.
CONFIG: dict[str, Any] = {
    "eos_airflow": {
        "description": "Defaults of the exactly-once operators, ``@task.exactly_once``, "
        "``LedgerSensor`` and the audit UI. An argument given to an operator wins over "
        "these. A value that is not valid fails the DAG's import with a message naming "
        "the option.\n",
        "options": {
            "ledger_schema": _option(
                "Schema holding the ledger in each target database (tasks, LedgerSensor, "
                "the audit UI, and ``eos-airflow --conn-id``).\n",
                "string",
                "eos",
                "eos_ledger",
            ),
            "ledger_conn_id": _option(
                "Airflow connection of the ledger database the audit UI (``/eos``) reads.\n",
                "string",
                "eos_ledger",
                "warehouse",
            ),
            "wait_timeout": _option(
                "Seconds a task waits for another live attempt holding its key (another "
                "run of the same effect) before failing with the retryable "
                "``KeyInProgressError``, which Airflow retries.\n",
                "float",
                "30.0",
                "120",
            ),
            "on_committed": _option(
                "What a task does when its key is committed already: ``skip`` (return the "
                "stored result without running the work), ``replace`` (run again and "
                "supersede the committed version) or ``fail`` (``AlreadyCommittedError``, "
                "not retried).\n",
                "string",
                "skip",
                "fail",
            ),
            "on_mismatch": _option(
                "What a skip does when the attempt's inputs (rendered SQL and parameters, "
                "call arguments, code) differ from those of the committed version: ``warn`` "
                "(skip, log a warning and record a ``mismatch`` event), ``fail`` "
                "(``FingerprintMismatchError``, not retried) or ``replace`` (run again).\n",
                "string",
                "warn",
                "fail",
            ),
            "max_result_bytes": _option(
                "Largest result, in bytes of JSON, stored in the ledger and returned again "
                "when a retry or re-run skips; a larger one fails with ``ResultError``.\n",
                "integer",
                "1048576",
                "65536",
            ),
            "liveness_timeout": _option(
                "Seconds within which PostgreSQL ends the session of a worker that went "
                "silent (a network partition, a frozen host), freeing its keys: each "
                "ledger connection opened through an Airflow connection (tasks, sensors "
                "in poke or reschedule mode, the audit UI) sets ``tcp_keepalives_idle`` (T/3), "
                "``tcp_keepalives_interval`` (T/6), ``tcp_keepalives_count`` (4), "
                "``tcp_user_timeout`` and ``client_connection_check_interval`` from it, and "
                "libpq's client-side keepalives alike. ``0`` leaves the server's settings "
                "alone; values between 0 and 5 are refused. Unset: ``EOS_LIVENESS_TIMEOUT`` "
                "from the environment, else 60 (deferred sensors' watcher in the triggerer "
                "reads only ``EOS_LIVENESS_TIMEOUT``).\n",
                "float",
                None,
                "60",
            ),
        },
    },
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "eos-airflow",
        "name": "eos-airflow",
        "description": "Exactly-once effects: a fenced PostgreSQL idempotency ledger that "
        "commits task outputs in the same transaction.",
        "task-decorators": [
            {
                "name": "exactly_once",
                "class-name": "eos_airflow.decorators.exactly_once.exactly_once_task",
            },
        ],
        "operators": [
            {
                "integration-name": "eos-airflow",
                "python-modules": [
                    "eos_airflow.operators.sql",
                    "eos_airflow.operators.transfer",
                    "eos_airflow.operators.incremental",
                    "eos_airflow.operators.multi",
                    "eos_airflow.operators.kafka",
                    "eos_airflow.operators.outbox",
                    "eos_airflow.operators.lakehouse",
                ],
            },
        ],
        "sensors": [
            {"integration-name": "eos-airflow", "python-modules": ["eos_airflow.sensors.ledger"]},
        ],
        "triggers": [
            {"integration-name": "eos-airflow", "python-modules": ["eos_airflow.triggers.ledger"]},
        ],
        "hooks": [
            {
                "integration-name": "eos-airflow",
                "python-modules": ["eos_airflow.hooks.ledger", "eos_airflow.hooks.nats"],
            },
        ],
        "connection-types": [
            {
                "hook-class-name": "eos_airflow.hooks.nats.NatsHook",
                "hook-name": "NATS",
                "connection-type": "nats",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema"],
                    "relabeling": {"login": "User (or token)", "password": "Password (or token)"},
                    "placeholders": {
                        "host": "nats.example.com",
                        "port": "4222",
                        "extra": '{"servers": ["nats://n1:4222", "nats://n2:4222"]}',
                    },
                },
            },
        ],
        "plugins": [
            {"name": "eos_airflow", "plugin-class": "eos_airflow.plugin.EosAirflowPlugin"},
        ],
        "config": CONFIG,
        "integrations": [
            {
                "integration-name": "eos-airflow",
                "external-doc-url": "https://pypi.org/project/eos-airflow/",
                "tags": ["service"],
            },
        ],
    }
