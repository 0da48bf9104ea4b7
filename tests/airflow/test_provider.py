"""Registration with Airflow: provider info, the task decorator, operator validation."""

from __future__ import annotations

import importlib
import inspect
import json
from importlib import resources
from importlib.metadata import entry_points

import jsonschema
import pytest

from eos_airflow.provider import get_provider_info
from tests.conftest import ROOT


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


#: provider-info section → the Airflow base class of what it lists; a class belongs to the
#: first section whose base it derives from (a sensor is an operator too, listed as a sensor)
SECTIONS = {
    "sensors": ("airflow.sdk", "BaseSensorOperator"),
    "operators": ("airflow.sdk", "BaseOperator"),
    "triggers": ("airflow.triggers.base", "BaseTrigger"),
    "hooks": ("airflow.sdk", "BaseHook"),
}


def _section(cls: type, bases: dict[str, type]) -> str | None:
    for section, base in bases.items():
        if issubclass(cls, base):
            return section
    return None


def test_every_module_defining_an_airflow_class_is_registered():
    """Each module under eos_airflow/operators, sensors, triggers and hooks that defines an
    operator, sensor, trigger or hook is listed in that section of the provider info, and
    every listed module imports. Classes meant to be derived from (``Base`` in the name, as
    ``ExactlyOnceBaseOperator``) and private ones are not registered."""
    bases = {
        section: getattr(importlib.import_module(package), name)
        for section, (package, name) in SECTIONS.items()
    }
    info = get_provider_info()
    registered = {
        section: {m for entry in info.get(section, []) for m in entry["python-modules"]}
        for section in SECTIONS
    }
    for modules in registered.values():
        for module in modules:
            importlib.import_module(module)
    found: dict[str, dict[str, list[str]]] = {section: {} for section in SECTIONS}
    for directory in ("operators", "sensors", "triggers", "hooks"):
        for path in sorted((ROOT / "eos_airflow" / directory).glob("*.py")):
            name = f"eos_airflow.{directory}.{path.stem}".removesuffix(".__init__")
            module = importlib.import_module(name)
            for attr, cls in vars(module).items():
                if not inspect.isclass(cls) or cls.__module__ != name or attr.startswith("_"):
                    continue
                section = _section(cls, bases)
                if section is not None and "Base" not in attr:
                    found[section].setdefault(name, []).append(attr)
    assert found["operators"] and found["sensors"] and found["triggers"], found
    missing = {
        section: {m: classes for m, classes in modules.items() if m not in registered[section]}
        for section, modules in found.items()
    }
    missing = {section: modules for section, modules in missing.items() if modules}
    assert not missing, f"get_provider_info() does not register: {missing}"


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


def test_the_nats_connection_type_is_registered_with_its_form(tmp_path):
    """Airflow knows the connection type ``nats`` (hook, name, form labels): ``airflow
    providers hooks`` lists it, and the UI's form gets its field behaviour."""
    import os
    import subprocess

    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    from tests.airflow.conftest import AIRFLOW

    hook = ProvidersManagerTaskRuntime().hooks["nats"]
    manager = ProvidersManager()  # the form's fields, for the api-server
    assert (hook.hook_class_name, hook.hook_name, hook.package_name) == (
        "eos_airflow.hooks.nats.NatsHook",
        "NATS",
        "eos-airflow",
    )
    assert manager.field_behaviours["nats"]["hidden_fields"] == ["schema"]
    assert manager.field_behaviours["nats"]["relabeling"]["login"] == "User (or token)"
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [AIRFLOW, "providers", "hooks", "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    start = run.stdout.index("[")
    rows = {row["connection_type"]: row for row in json.loads(run.stdout[start:])}
    assert rows["nats"]["class"] == "eos_airflow.hooks.nats.NatsHook"


def test_a_nats_connection_gives_the_relay_its_servers(monkeypatch):
    from eos_airflow.hooks.nats import NatsHook
    from eos_airflow.relay.sinks import NatsCredentials, split_url

    monkeypatch.setenv("AIRFLOW_CONN_NATS_T", "nats://relay:p%40ss%2Fw@nats.example.com:4999")
    monkeypatch.setenv(
        "AIRFLOW_CONN_NATS_CLUSTER",
        '{"conn_type": "nats", "extra": {"servers": ["nats://n1:4222", "nats://n2:4222"]}}',
    )
    (url,) = NatsHook(nats_conn_id="nats_t").servers()
    assert split_url(url) == ("nats://nats.example.com:4999", NatsCredentials("relay", "p@ss/w"))
    assert NatsHook(nats_conn_id="nats_cluster").get_conn() == ["nats://n1:4222", "nats://n2:4222"]
    with pytest.raises(ValueError, match="AIRFLOW_CONN_NO_SUCH_NATS='nats://HOST:4222'"):
        NatsHook(nats_conn_id="no_such_nats").servers()
