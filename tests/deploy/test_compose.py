"""docker-compose.yml and Dockerfile, validated without a Docker engine."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-triggerer",
    "airflow-init",
)
LONG_RUNNING = (
    "postgres",
    "warehouse",
    "redis",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-triggerer",
)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_of_the_official_topology_is_there(compose):
    assert set(compose["services"]) == {"postgres", "warehouse", "redis", *AIRFLOW_SERVICES}
    commands = {name: compose["services"][name].get("command") for name in AIRFLOW_SERVICES}
    assert commands["airflow-apiserver"] == "api-server"
    assert commands["airflow-scheduler"] == "scheduler"
    assert commands["airflow-dag-processor"] == "dag-processor"
    assert commands["airflow-worker"] == "celery worker"
    assert commands["airflow-triggerer"] == "triggerer"


def test_image_and_dockerfile_pin_the_airflow_version_we_test(compose):
    tested = version("apache-airflow")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^ARG AIRFLOW_VERSION={re.escape(tested)}$", dockerfile, re.M)
    assert "FROM apache/airflow:${AIRFLOW_VERSION}" in dockerfile
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in dockerfile  # never upgrades Airflow
    for name in AIRFLOW_SERVICES:
        service = compose["services"][name]
        assert service["build"]["args"]["AIRFLOW_VERSION"] == tested
        assert service["image"] == "${EOS_AIRFLOW_IMAGE:-eos-airflow:" + tested + "}"


def test_dags_and_plugins_are_mounted_into_every_airflow_service(compose):
    for name in AIRFLOW_SERVICES:
        mounts = compose["services"][name]["volumes"]
        targets = {m.rsplit(":", 1)[1] for m in mounts}
        assert {"/opt/airflow/dags", "/opt/airflow/plugins"} <= targets, name
    assert (ROOT / "dags" / "eos_sales_daily.py").exists()
    assert (ROOT / "plugins" / "eos_airflow_plugin.py").exists()


def test_long_running_services_have_healthchecks_and_waits_are_satisfiable(compose):
    services = compose["services"]
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and check["test"], f"{name} has no healthcheck"
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} waits for unknown {dependency}"
            if rule["condition"] == "service_healthy":
                assert services[dependency].get("healthcheck"), (name, dependency)
            elif rule["condition"] == "service_completed_successfully":
                assert dependency == "airflow-init"


def test_init_migrates_airflow_and_the_ledger(compose):
    init = compose["services"]["airflow-init"]
    script = "\n".join(init["command"])
    assert script.index("airflow db migrate") < script.index(
        "eos-airflow db migrate --conn-id eos_warehouse"
    )
    env = compose["x-airflow-common"]["environment"]
    assert env["AIRFLOW_CONN_EOS_WAREHOUSE"].endswith("@warehouse:5432/warehouse")
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:")


def test_warehouse_allows_prepared_transactions(compose):
    command = compose["services"]["warehouse"]["command"]
    assert "max_prepared_transactions=64" in command
