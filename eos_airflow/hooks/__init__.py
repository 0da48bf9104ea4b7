"""Adapters tier: Airflow connections to the ledger database."""
