"""Adapters tier: ``@task.exactly_once``."""
