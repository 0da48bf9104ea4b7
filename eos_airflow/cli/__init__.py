"""Faces tier: the ``eos-airflow`` command."""
