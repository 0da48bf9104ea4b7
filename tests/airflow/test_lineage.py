"""OpenLineage under real Airflow (`airflow dags test` with the provider's file transport): the
events of an exactly-once task name the tables it reads and writes and carry the run facet
``eos``; a re-run that skips the committed effect says so."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from eos_airflow.hooks.ledger import airflow_conn_json

pytest.importorskip("airflow.providers.openlineage", reason="needs the OpenLineage provider")

pytestmark = pytest.mark.airflow

DAY = "2026-12-01"
SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "lineage" / "EosRunFacet.json"


@pytest.fixture
def lineage(airflow, db: str, tmp_path) -> Path:
    """Orders in ``db``, and Airflow writing its OpenLineage events to a file."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE lineage_orders (day date, amount int)")
        conn.execute("CREATE TABLE lineage_totals (day date, total int)")
        conn.execute("CREATE TABLE lineage_copy (day date, amount int)")
        conn.execute(
            "INSERT INTO lineage_orders SELECT %s::date + g %% 2, g FROM generate_series(1, 10) g",
            [DAY],
        )
    events = tmp_path / "events.jsonl"
    airflow.env["AIRFLOW__OPENLINEAGE__TRANSPORT"] = json.dumps(
        {"type": "file", "log_file_path": str(events), "append": True}
    )
    airflow.env["AIRFLOW__OPENLINEAGE__NAMESPACE"] = "eos-tests"
    return events


def completed(events: Path, job: str) -> list[dict]:
    """The COMPLETE events of job ``job`` (``dag_id.task_id``), in order."""
    found = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return [e for e in found if e["eventType"] == "COMPLETE" and e["job"]["name"] == job]


def names(datasets: list[dict]) -> list[tuple[str, str]]:
    return [(d["namespace"], d["name"]) for d in datasets]


def check_schema(facet: dict) -> None:
    import jsonschema

    defs = json.loads(SCHEMA.read_text())["$defs"]["EosRunFacet"]["allOf"][1]
    jsonschema.validate(facet, defs)
    assert facet["_schemaURL"].endswith("EosRunFacet.json#/$defs/EosRunFacet")


def test_sql_operator_reports_its_tables_and_the_skip(airflow, lineage, db: str):
    info = psycopg.conninfo.conninfo_to_dict(db)
    namespace = f"postgres://{info.get('host', 'localhost')}:{info.get('port', 5432)}"
    database = info["dbname"]

    for _ in range(2):  # the second run finds the key committed and skips
        done = airflow.dags_test("eos_lineage_sql", DAY)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT day::text, total FROM lineage_totals").fetchall() == [(DAY, 30)]
    events = completed(lineage, "eos_lineage_sql.summarize")
    assert len(events) == 2, [e["job"]["name"] for e in events]
    for event, action in zip(events, ["committed", "skipped"], strict=True):
        assert names(event["outputs"]) == [(namespace, f"{database}.public.lineage_totals")]
        assert names(event["inputs"]) == [(namespace, f"{database}.public.lineage_orders")]
        facet = event["run"]["facets"]["eos"]
        check_schema(facet)
        assert {k: facet[k] for k in ("key", "version", "action", "attempt", "ledgerConnId")} == {
            "key": f"lineage/totals/{DAY}",
            "version": 1,
            "action": action,
            "attempt": 1,
            "ledgerConnId": "warehouse",
        }
        assert facet["committedAt"]
        assert "extractionError" not in event["run"]["facets"]  # the placeholders parse
        assert event["job"]["facets"]["sql"]["query"] == (
            "INSERT INTO lineage_totals (day, total) SELECT day, sum(amount) "
            "FROM lineage_orders WHERE day = %(day)s GROUP BY day"
        )
    first, second = (e["run"]["facets"]["eos"]["committedAt"] for e in events)
    assert first == second  # the skip reports the version committed by the first run

    copies = completed(lineage, "eos_lineage_sql.copy")
    assert [e["run"]["facets"]["eos"]["action"] for e in copies] == ["committed", "skipped"]
    for event in copies:
        assert names(event["inputs"]) == [(namespace, f"{database}.public.lineage_orders")]
        assert names(event["outputs"]) == [(namespace, f"{database}.public.lineage_copy")]
        assert event["run"]["facets"]["eos"]["key"] == f"lineage/copy/{DAY}"

    # finding the lineage asks the database questions; they are not reported as queries
    queries = [
        event["job"]["facets"]["sql"]["query"]
        for event in map(json.loads, lineage.read_text().splitlines())
        if "sql" in event["job"].get("facets", {})
    ]
    assert queries and not [q for q in queries if "current_schema" in q.lower()], queries


@pytest.mark.slow  # with the SQL test above, more than the default tier's budget
def test_lakehouse_operators_report_the_iceberg_and_delta_tables(
    airflow, lineage, db: str, tmp_path
):
    lake = tmp_path / "lake"
    lake.mkdir()
    airflow.env["AIRFLOW_CONN_LAKEHOUSE"] = airflow_conn_json(db)
    airflow.env["EOS_TEST_LAKE"] = lake.as_uri()
    info = psycopg.conninfo.conninfo_to_dict(db)
    namespace = f"postgres://{info.get('host', 'localhost')}:{info.get('port', 5432)}"

    done = airflow.dags_test("eos_lineage_lake", DAY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (event,) = completed(lineage, "eos_lineage_lake.iceberg")
    assert names(event["inputs"]) == [(namespace, f"{info['dbname']}.public.lineage_orders")]
    (output,) = event["outputs"]
    assert output["namespace"] == "file"
    assert Path(output["name"]).parent.parent == lake  # <warehouse>/<namespace>/<table>
    assert Path(output["name"]).is_dir()  # the table's files are there
    catalog = f"{namespace}/{info['dbname']}"
    assert output["facets"]["symlinks"]["identifiers"] == [
        {"namespace": catalog, "name": "lake.orders", "type": "TABLE"}
    ]
    assert output["facets"]["catalog"]["framework"] == "iceberg"
    assert output["facets"]["catalog"]["warehouseUri"] == lake.as_uri()
    facet = event["run"]["facets"]["eos"]
    check_schema(facet)
    assert (facet["key"], facet["version"], facet["action"], facet["ledgerConnId"]) == (
        f"lineage/iceberg/{DAY}",
        1,
        "committed",
        "lakehouse",
    )

    (event,) = completed(lineage, "eos_lineage_lake.delta")
    assert names(event["inputs"]) == [(namespace, f"{info['dbname']}.public.lineage_orders")]
    assert names(event["outputs"]) == [("file", str(lake / "delta_orders"))]
    assert (lake / "delta_orders" / "_delta_log").is_dir()
    facet = event["run"]["facets"]["eos"]
    assert (facet["key"], facet["action"]) == (f"lineage/delta/{DAY}", "committed")


def test_placeholders_are_read_as_parameters_and_locations_as_datasets():
    from eos_airflow.operators.lineage import location_dataset, parseable

    assert parseable(
        "SELECT * FROM t WHERE a = %(a)s AND b = %s AND c LIKE 'x%%' AND d = %(a)s"
    ) == ("SELECT * FROM t WHERE a = $1 AND b = $2 AND c LIKE 'x%' AND d = $3")
    local = location_dataset("file:///data/lake/sales/")
    assert (local.namespace, local.name) == ("file", "/data/lake/sales")
    remote = location_dataset("s3://bucket/lake/sales")
    assert (remote.namespace, remote.name) == ("s3://bucket", "lake/sales")
