"""Faces tier: the audit page inside the Airflow api-server (see :mod:`eos_airflow.plugin`).

:mod:`eos_airflow.web.data` reads the ledger (no Airflow imports, testable on its own);
:mod:`eos_airflow.web.app` is the FastAPI app that Airflow mounts at ``/eos``, with every
route behind Airflow's authentication and DAG read permission.
"""
