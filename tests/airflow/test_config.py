"""The ``[eos_airflow]`` configuration section: declared in the provider info, shown by
``airflow config list``, read as the operators' defaults, refused with a clear message."""

from __future__ import annotations

import os
import subprocess

import psycopg
import pytest

from eos_airflow import config
from eos_airflow.errors import ConfigurationError
from eos_airflow.hooks.ledger import airflow_conn_json, connect_factory
from eos_airflow.ledger.connection import DEFAULT_LIVENESS_TIMEOUT
from eos_airflow.protocol.effect import MAX_RESULT_BYTES
from eos_airflow.protocol.local import DEFAULT_WAIT_TIMEOUT
from eos_airflow.provider import get_provider_info
from tests.airflow.conftest import AIRFLOW
from tests.conftest import ROOT

OPTIONS = {
    "ledger_schema": "eos",
    "ledger_conn_id": "eos_ledger",
    "wait_timeout": str(DEFAULT_WAIT_TIMEOUT),
    "on_committed": "skip",
    "on_mismatch": "warn",
    "max_result_bytes": str(MAX_RESULT_BYTES),
    "liveness_timeout": None,  # unset: EOS_LIVENESS_TIMEOUT, else 60 s
}


@pytest.fixture
def clean_env(monkeypatch):
    """No [eos_airflow] setting from the environment running the tests."""
    for name in list(os.environ):
        if name.startswith("AIRFLOW__EOS_AIRFLOW__") or name == "EOS_LIVENESS_TIMEOUT":
            monkeypatch.delenv(name)
    return monkeypatch


def airflow_cli(*argv: str, tmp_path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__EOS_AIRFLOW__")}
    full.update(AIRFLOW_HOME=str(tmp_path), PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [AIRFLOW, *argv], env=full, capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_the_provider_declares_every_option_with_the_codes_defaults():
    section = get_provider_info()["config"]["eos_airflow"]
    assert {name: o["default"] for name, o in section["options"].items()} == OPTIONS
    assert config.DEFAULT_LEDGER_SCHEMA == OPTIONS["ledger_schema"]
    assert config.DEFAULT_LEDGER_CONN_ID == OPTIONS["ledger_conn_id"]
    for name, option in section["options"].items():
        assert option["description"] and option["type"] in {"string", "integer", "float"}, name
        assert option["example"] is not None, name
    assert DEFAULT_LIVENESS_TIMEOUT == 60.0  # what the liveness_timeout description says


def test_the_defaults_without_any_setting(clean_env):
    assert config.ledger_schema() == "eos"
    assert config.ledger_conn_id() == "eos_ledger"
    assert config.wait_timeout() == DEFAULT_WAIT_TIMEOUT
    assert config.on_committed() == "skip"
    assert config.on_mismatch() == "warn"
    assert config.max_result_bytes() == MAX_RESULT_BYTES
    assert config.liveness_timeout() is None


def test_airflow_config_list_shows_the_section_with_descriptions(tmp_path):
    run = airflow_cli(
        "config",
        "list",
        "--section",
        "eos_airflow",
        "--include-descriptions",
        "--show-values",
        tmp_path=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "[eos_airflow]" in out
    for name, default in OPTIONS.items():
        assert (f"{name} = {default}" if default else f"# {name} = ") in out, name
    assert "# Seconds a task waits for another live attempt holding its key" in out
    assert "``skip`` (return the stored result without running the work)" in out
    assert "``tcp_keepalives_idle`` (T/3)" in out


def test_an_environment_setting_is_what_airflow_reports(tmp_path):
    run = airflow_cli(
        "config",
        "get-value",
        "eos_airflow",
        "wait_timeout",
        tmp_path=tmp_path,
        AIRFLOW__EOS_AIRFLOW__WAIT_TIMEOUT="5",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "5"


def test_settings_are_the_operators_defaults_and_arguments_win(clean_env):
    from eos_airflow import ExactlyOnceSQLOperator, LedgerSensor, OutboxRelayOperator, exactly_once

    clean_env.setenv("AIRFLOW__EOS_AIRFLOW__WAIT_TIMEOUT", "5")
    clean_env.setenv("AIRFLOW__EOS_AIRFLOW__ON_COMMITTED", "fail")
    clean_env.setenv("AIRFLOW__EOS_AIRFLOW__LEDGER_SCHEMA", "eos_cfg")
    clean_env.setenv("AIRFLOW__EOS_AIRFLOW__MAX_RESULT_BYTES", "4096")
    op = ExactlyOnceSQLOperator(task_id="t", conn_id="w", sql="SELECT 1")
    assert (op.wait_timeout, op.on_committed, op.ledger_schema, op.max_result_bytes) == (
        5.0,
        "fail",
        "eos_cfg",
        4096,
    )
    given = ExactlyOnceSQLOperator(
        task_id="t2",
        conn_id="w",
        sql="SELECT 1",
        wait_timeout=7,
        on_committed="skip",
        ledger_schema="eos",
        max_result_bytes=100,
    )
    assert (given.wait_timeout, given.on_committed, given.ledger_schema) == (7, "skip", "eos")
    assert given.max_result_bytes == 100

    @exactly_once(conn_id="w")
    def load(eos):
        return 1

    from airflow.sdk import DAG

    with DAG("cfg", schedule=None):
        decorated = load().operator
    assert (decorated.wait_timeout, decorated.ledger_schema) == (5.0, "eos_cfg")
    sensor = LedgerSensor(task_id="s", conn_id="w", key="k")
    relay = OutboxRelayOperator(task_id="r", conn_id="w", nats_url="nats://h:4222")
    assert sensor.ledger_schema == relay.ledger_schema == "eos_cfg"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("on_committed", "maybe", "choose one of skip, replace, fail"),
        ("on_mismatch", "ignore", "choose one of warn, fail, replace"),
        ("wait_timeout", "soon", "give a number of seconds >= 0"),
        ("wait_timeout", "-1", "give a number of seconds >= 0"),
        ("max_result_bytes", "1MB", "give a whole number of bytes >= 1"),
        ("ledger_schema", "Eos-Ledger", "a ledger schema must be a plain lowercase identifier"),
        ("liveness_timeout", "2", "use at least 5 seconds"),
    ],
)
def test_a_bad_setting_names_the_option_the_value_and_the_fix(clean_env, option, value, message):
    clean_env.setenv(f"AIRFLOW__EOS_AIRFLOW__{option.upper()}", value)
    with pytest.raises(ConfigurationError) as caught:
        getattr(config, option)()
    text = str(caught.value)
    assert text.startswith(f"[eos_airflow] {option} = {value!r} is not valid: ")
    assert message in text
    assert f"AIRFLOW__EOS_AIRFLOW__{option.upper()}" in text


def test_a_bad_setting_fails_the_dags_import_not_an_operator_given_the_argument(clean_env):
    from eos_airflow import ExactlyOnceSQLOperator

    clean_env.setenv("AIRFLOW__EOS_AIRFLOW__ON_COMMITTED", "maybe")
    with pytest.raises(ValueError, match=r"\[eos_airflow\] on_committed = 'maybe'"):
        ExactlyOnceSQLOperator(task_id="t", conn_id="w", sql="SELECT 1")
    op = ExactlyOnceSQLOperator(task_id="t", conn_id="w", sql="SELECT 1", on_committed="skip")
    assert op.on_committed == "skip"


@pytest.mark.airflow
def test_a_bad_setting_is_the_dag_files_import_error(airflow):
    env = {**airflow.env, "AIRFLOW__EOS_AIRFLOW__ON_COMMITTED": "maybe"}
    run = subprocess.run(
        [AIRFLOW, "dags", "list-import-errors", "--local", "--output", "plain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout + run.stderr
    assert "eos_test_dags.py" in out, out[-3000:]
    assert (
        "[eos_airflow] on_committed = 'maybe' is not valid: choose one of skip, replace, fail"
        in out
    )
    assert "AIRFLOW__EOS_AIRFLOW__ON_COMMITTED" in out


def test_the_liveness_setting_reaches_the_session(clean_env, db):
    clean_env.setenv("AIRFLOW_CONN_LIVE", airflow_conn_json(db))
    clean_env.setenv("AIRFLOW__EOS_AIRFLOW__LIVENESS_TIMEOUT", "30")
    clean_env.setenv("EOS_LIVENESS_TIMEOUT", "90")  # the Airflow setting wins
    with connect_factory("live")() as conn:
        assert conn.execute("SHOW tcp_user_timeout").fetchone() == ("30000",)  # ms
        assert conn.execute("SHOW tcp_keepalives_idle").fetchone() == ("10",)  # T/3, s
    clean_env.delenv("AIRFLOW__EOS_AIRFLOW__LIVENESS_TIMEOUT")
    with connect_factory("live")() as conn:
        assert conn.execute("SHOW tcp_user_timeout").fetchone() == ("90000",)
    with psycopg.connect(db) as plain:  # a session that did not ask keeps the server's
        assert plain.execute("SHOW tcp_user_timeout").fetchone() == ("0",)
