"""Adapters tier: ``LedgerSensor``."""
