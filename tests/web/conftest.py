"""Real Airflow for the web tests: the fixtures of tests/airflow (a metadata database,
connections, `airflow dags test`)."""

from tests.airflow.conftest import airflow, airflow_base  # noqa: F401
