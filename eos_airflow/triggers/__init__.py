"""Adapters tier: ``LedgerTrigger``."""
