"""Faces tier: development and demonstration tooling, not needed at runtime.

``stack`` runs Airflow's compose topology as local processes, ``embedded`` starts a private
PostgreSQL, ``demo`` and ``demo_examples`` drive ``eos-airflow demo``, ``stack_cli`` implements
``eos-airflow stack ...``; ``dags/`` holds the example DAGs the demo and the stack run.
"""
