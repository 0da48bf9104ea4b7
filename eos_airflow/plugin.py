"""Faces tier: the Airflow plugin: the ledger's audit page in the Airflow UI.

Registered through the provider entry point (``get_provider_info()["plugins"]``), so an
installed eos-airflow needs no file in ``$AIRFLOW_HOME/plugins``. It adds:

- a FastAPI app at ``/eos`` on the api-server (:mod:`eos_airflow.web.app`): the audit page,
  the task-instance page and their JSON API, all behind Airflow's authentication;
- a nav entry ("Browse" → "Exactly-once audit") showing the audit page, and a task-instance
  tab showing that instance's ledger entry. Airflow fills ``{DAG_ID}``, ``{RUN_ID}``,
  ``{TASK_ID}`` and ``{MAP_INDEX}`` in the tab's URL.

Importing this module is cheap: the web app is imported on the first request the
api-server passes to it (:class:`LazyApp`).
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/eos"


class LazyApp:
    """An ASGI app that imports :mod:`eos_airflow.web.app` on its first request.

    Every Airflow process loads plugins (schedulers, workers, the CLI); only the api-server
    serves requests, so only it pays for importing the web app and Airflow's API security
    modules.
    """

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._app is None:
            from eos_airflow.web.app import app

            self._app = app
        await self._app(scope, receive, send)


app = LazyApp()


class EosAirflowPlugin(AirflowPlugin):
    """Audit views of the exactly-once ledger."""

    name = "eos_airflow"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "eos-airflow audit"}]
    external_views = [
        {
            "name": "Exactly-once audit",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "eos_audit",
        },
        {
            "name": "Exactly-once",
            "destination": "task_instance",
            "url_route": "eos_ti",
            "href": f"{URL_PREFIX}/ti/{{DAG_ID}}/{{RUN_ID}}/{{TASK_ID}}/{{MAP_INDEX}}",
        },
    ]
