"""Adapters tier: provider metadata read by Airflow through the ``apache_airflow_provider`` entry
point.

Kept import-light: Airflow calls this for every command, so it must not import Airflow.
"""

from __future__ import annotations

from typing import Any


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
            {"integration-name": "eos-airflow", "python-modules": ["eos_airflow.hooks.ledger"]},
        ],
        "plugins": [
            {"name": "eos_airflow", "plugin-class": "eos_airflow.plugin.EosAirflowPlugin"},
        ],
        "integrations": [
            {
                "integration-name": "eos-airflow",
                "external-doc-url": "https://pypi.org/project/eos-airflow/",
                "tags": ["service"],
            },
        ],
    }
