"""Registration with Airflow: provider info, the task decorator, operator validation."""

from __future__ import annotations

import json
from importlib import resources
from importlib.metadata import entry_points

import jsonschema
import pytest

from eos_airflow.provider import get_provider_info


def test_provider_info_matches_airflows_schema():
    schema = json.loads(
        resources.files("airflow").joinpath("provider_info.schema.json").read_text()
    )
    info = get_provider_info()
    jsonschema.validate(info, schema)
    assert info["package-name"] == "eos-airflow"
    (entry,) = [
        e
        for e in entry_points(group="apache_airflow_provider")
        if e.value == "eos_airflow.provider:get_provider_info"
    ]
    assert entry.load() is get_provider_info


def test_task_exactly_once_is_registered_through_the_provider():
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk import task

    import eos_airflow

    assert task.exactly_once is eos_airflow.exactly_once
    assert "eos-airflow" in ProvidersManager().providers


def test_operator_validates_its_options_listing_the_choices():
    from eos_airflow import ExactlyOnceSQLOperator

    with pytest.raises(ValueError, match="is not valid; choose one of skip, replace, fail"):
        ExactlyOnceSQLOperator(task_id="t", conn_id="w", sql="SELECT 1", on_committed="once")
    with pytest.raises(ValueError, match="non-empty SQL"):
        ExactlyOnceSQLOperator(task_id="t", conn_id="w", sql="")
    with pytest.raises(TypeError, match="conn_id"):
        ExactlyOnceSQLOperator(task_id="t", sql="SELECT 1")


def test_decorated_function_parses_without_passing_eos():
    from airflow.sdk import dag, task

    @dag(schedule=None)
    def parse_only():
        @task.exactly_once(conn_id="w", key="k/{{ ds }}")
        def load(eos, n: int):
            return n

        load(n=3)

    built = parse_only()
    op = built.get_task("load")
    assert op.custom_operator_name == "@task.exactly_once"
    assert op.op_kwargs == {"n": 3, "eos": None}
    assert (op.conn_id, op.key, op.on_committed) == ("w", "k/{{ ds }}", "skip")
