"""Faces tier: the FastAPI app Airflow mounts at ``/eos``: the audit page, the task-instance tab and
their JSON API.

Airflow 3 mounts plugin apps *without* authentication, so every route here depends on
Airflow's own security dependencies: ``requires_access_dag("GET")`` (a valid session cookie
or bearer token, and permission to read DAGs: the one named by the ``dag_id`` parameter, or
all DAGs) and the list of DAGs the user may read, which filters every list. Unauthenticated
requests get 401, users without permission 403.

The ledger is read from the Airflow connection ``[eos_airflow] ledger_conn_id`` (default
``eos_ledger``; env ``AIRFLOW__EOS_AIRFLOW__LEDGER_CONN_ID``), schema
``[eos_airflow] ledger_schema`` (default ``eos``). Handlers are plain ``def``: FastAPI runs
them in its thread pool, so the blocking database calls never stall the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Annotated, Any, Literal

import psycopg
from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response

from eos_airflow.errors import ConfigurationError, EosError
from eos_airflow.states import EntryState
from eos_airflow.web import data

#: Longest a page's query may run (ms): the page stays responsive on a big ledger.
STATEMENT_TIMEOUT_MS = 60_000


def settings() -> tuple[str, str]:
    """(connection id, schema) from Airflow's configuration (eos_airflow/config.py)."""
    from eos_airflow import config

    return config.ledger_conn_id(), config.ledger_schema()


@contextmanager
def ledger() -> Iterator[tuple[psycopg.Connection[Any], str]]:
    from eos_airflow.hooks.ledger import connect_factory
    from eos_airflow.ledger.migrate import check_revision

    try:
        conn_id, schema = settings()
    except EosError as exc:  # e.g. [eos_airflow] ledger_schema is not a schema name
        raise HTTPException(503, str(exc)) from exc
    try:
        conn = connect_factory(conn_id)()
    except EosError as exc:
        raise HTTPException(503, f"{exc} ([eos_airflow] ledger_conn_id = {conn_id!r})") from exc
    try:
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false)", [str(STATEMENT_TIMEOUT_MS)]
        )
        try:
            check_revision(conn, schema)
        except EosError as exc:
            raise HTTPException(503, str(exc)) from exc
        yield conn, schema
    finally:
        conn.close()


def dag_scope(user: GetUserDep) -> set[str] | None:
    """The DAG ids the user may read; None when the user may read every DAG (then entries
    written outside Airflow, without a DAG, are shown too). (Airflow's own
    ``ReadableDagsFilterDep`` needs the core API app's state, which a plugin app lacks.)"""
    auth_manager = get_auth_manager()
    if auth_manager.is_authorized_dag(method="GET", user=user):
        return None
    return set(auth_manager.get_authorized_dag_ids(user=user, method="GET"))


DagScope = Annotated[set[str] | None, Depends(dag_scope)]


_protected = [Depends(requires_access_dag("GET"))]


def _visible(dag_id: str | None, scope: set[str] | None) -> bool:
    return scope is None or dag_id in scope


def _page(name: str, request: Request, **values: Any) -> HTMLResponse:
    template = resources.files("eos_airflow.web").joinpath("templates", name).read_text("utf-8")
    config = {"base": request.scope.get("root_path", ""), **values}
    # JSON inside <script>: escape "<" so no value can close the script element
    payload = json.dumps(config).replace("<", "\\u003c")
    return HTMLResponse(template.replace("__EOS_CONFIG__", payload))


def _json_error(exc: EosError) -> HTTPException:
    return HTTPException(400, str(exc))


def create_app() -> FastAPI:
    app = FastAPI(title="eos-airflow audit", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse, dependencies=_protected)
    def audit_page(request: Request) -> HTMLResponse:
        return _page("audit.html", request, view="audit")

    @app.get(
        "/ti/{dag_id}/{run_id}/{task_id}/{map_index}",
        response_class=HTMLResponse,
        dependencies=_protected,
    )
    def ti_page(
        request: Request, dag_id: str, run_id: str, task_id: str, map_index: str
    ) -> HTMLResponse:
        return _page(
            "audit.html",
            request,
            view="ti",
            ti={
                "dag_id": dag_id,
                "run_id": run_id,
                "task_id": task_id,
                "map_index": _map_index(map_index),
            },
        )

    @app.get("/static/audit.js", dependencies=_protected)
    def script() -> Response:
        text = resources.files("eos_airflow.web").joinpath("static", "audit.js").read_text()
        return Response(
            text, media_type="text/javascript", headers={"Cache-Control": "private, max-age=300"}
        )

    @app.get("/api/entries", dependencies=_protected)
    def api_entries(
        scope: DagScope,
        state: Annotated[EntryState | None, Query()] = None,
        dag_id: str | None = None,
        prefix: str | None = None,
        since: str | None = None,
        limit: Annotated[int, Query(ge=1, le=data.MAX_ENTRIES)] = 200,
    ) -> dict[str, Any]:
        try:
            with ledger() as (conn, schema):
                rows = data.entries(
                    conn,
                    schema,
                    state=state,
                    dag_id=dag_id,
                    prefix=prefix,
                    since=since,
                    limit=limit,
                    dag_ids=scope,
                )
        except ConfigurationError as exc:
            raise _json_error(exc) from exc
        return {"entries": rows, "count": len(rows)}

    @app.get("/api/entry", dependencies=_protected)
    def api_entry(key: str, scope: DagScope) -> dict[str, Any]:
        with ledger() as (conn, schema):
            found = data.entry(conn, schema, key)
        if found is None or not _visible(found["entry"]["dag_id"], scope):
            raise HTTPException(404, f"no ledger entry for key {key!r} that you may read")
        return found

    @app.get("/api/ti/{dag_id}/{run_id}/{task_id}/{map_index}", dependencies=_protected)
    def api_ti(
        dag_id: str, run_id: str, task_id: str, map_index: str, scope: DagScope
    ) -> dict[str, Any]:
        with ledger() as (conn, schema):
            found = data.ti_entries(conn, schema, dag_id, run_id, task_id, _map_index(map_index))
        found = [e for e in found if _visible(e["entry"]["dag_id"], scope)]
        return {
            "task_instance": {
                "dag_id": dag_id,
                "run_id": run_id,
                "task_id": task_id,
                "map_index": _map_index(map_index),
            },
            "entries": found,
        }

    @app.get("/api/activity", dependencies=_protected)
    def api_activity(
        scope: DagScope, since: str | None = None, bucket: Literal["hour", "day"] = "hour"
    ) -> dict[str, Any]:
        try:
            with ledger() as (conn, schema):
                return data.activity(conn, schema, since=since, bucket=bucket, dag_ids=scope)
        except ConfigurationError as exc:
            raise _json_error(exc) from exc

    @app.get("/api/verify", dependencies=_protected)
    def api_verify(scope: DagScope) -> dict[str, Any]:
        if scope is not None:
            raise HTTPException(403, "verifying the whole ledger needs read access to all DAGs")
        with ledger() as (conn, schema):
            return data.verification(conn, schema)

    return app


def _map_index(value: str) -> int:
    if value in ("{MAP_INDEX}", ""):  # the UI leaves the placeholder for unmapped tasks
        return -1
    try:
        return int(value)
    except ValueError:
        raise HTTPException(400, f"map_index must be an integer, got {value!r}") from None


app = create_app()
